//! Plackett–Luce: the probability of a ranking under softmax scores.
//!
//! Items `0..m` have scores `s`. A ranking `r = (r_1, …, r_k)` lists the `k` best items in
//! order (`k = m` for a full ranking; for `k < m` the other items rank below them in no
//! stated order). Each position is a softmax over the items that remain:
//!
//! ```text
//! log P(r | s) = Σ_{i=1..k} [ s_{r_i} − lse(R_i) ],   R_i = items not among r_1 … r_{i−1}
//! ```
//!
//! # Stability
//!
//! `lse(R_i)` is never formed as `log(Z − cumsum)`, which cancels when the top items carry
//! almost all the mass. The sets `R_k ⊂ … ⊂ R_1` grow backwards, so the lse's are built
//! from the last position to the first by `logaddexp` alone: no subtraction, exact to
//! rounding whatever the score gaps. Each is kept as `a_i + ρ_i`, with `a_i` the largest
//! score in `R_i` (exact) and `ρ_i ∈ [0, ln m]`, and only differences such as `s_r − a_i`
//! are formed: a large offset shared by all scores (1e20) costs nothing, where `lse` itself
//! would round away everything below its own ulp.
//!
//! The gradient is `∂/∂s_j = [j ranked] − Σ_{i ≤ p(j)} exp(s_j − lse(R_i))`, with `p(j)` the
//! position of `j` (or `k` for unranked items); the inner sum is kept in log space too,
//! relative to `a_{p(j)}`.

use crate::error::{Error, Result};

fn logaddexp(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Checks a ranking of items `0..m`: non-empty, no repeats, no unknown items.
fn check_ranking(m: usize, ranking: &[usize]) -> Result<()> {
    if ranking.is_empty() {
        return Err(Error::InvalidArgument("the ranking is empty".into()));
    }
    // (A set of the ranking's own items: work in proportion to k, not to m.)
    let mut seen = std::collections::HashSet::with_capacity(ranking.len());
    for (i, &r) in ranking.iter().enumerate() {
        if r >= m {
            return Err(Error::InvalidArgument(format!("ranking[{i}] = {r} is not an item (there are {m} items)")));
        }
        if !seen.insert(r) {
            return Err(Error::InvalidArgument(format!("ranking[{i}] = {r} repeats an item ranked earlier")));
        }
    }
    Ok(())
}

/// `lse(R_i) = a_i + ρ_i` for every position `i` of the ranking, as `(a_i, ρ_i)`: `a_i` the
/// largest score in `R_i`, `ρ_i = ln Σ_{j ∈ R_i} exp(s_j − a_i)`. Built backwards by
/// `logaddexp` of differences.
fn position_lse(scores: &[f32], ranking: &[usize]) -> Vec<(f64, f64)> {
    let mut ranked = vec![false; scores.len()];
    ranking.iter().for_each(|&r| ranked[r] = true);
    // Adds a score to a set's `(a, ρ)` (an empty set is `(−inf, −inf)`).
    let add = |(a, rho): (f64, f64), s: f64| {
        if s > a { (s, logaddexp(rho + (a - s), 0.0)) } else { (a, logaddexp(rho, s - a)) }
    };
    // Items below the ranking (none for a full ranking).
    let mut acc = scores
        .iter()
        .zip(&ranked)
        .filter(|(_, r)| !**r)
        .fold((f64::NEG_INFINITY, f64::NEG_INFINITY), |acc, (&s, _)| add(acc, s as f64));
    let mut lse = vec![(0f64, 0f64); ranking.len()];
    for (i, &r) in ranking.iter().enumerate().rev() {
        acc = add(acc, scores[r] as f64);
        lse[i] = acc;
    }
    lse
}

/// `Σ_i s_{r_i} − lse(R_i)`, each term formed from differences (see [`position_lse`]).
fn sum_log_terms(scores: &[f32], ranking: &[usize], lse: &[(f64, f64)]) -> f64 {
    ranking.iter().zip(lse).map(|(&r, &(a, rho))| (scores[r] as f64 - a) - rho).sum()
}

fn check_scores(scores: &[f32]) -> Result<()> {
    match scores.iter().position(|s| !s.is_finite()) {
        Some(j) => Err(Error::NonFiniteEntry { tensor: "scores".into(), index: j, value: scores[j] }),
        None => Ok(()),
    }
}

/// `log P(ranking | scores)` for a full or top-k ranking.
///
/// ```
/// // Two items: P(1 before 0) = e^1 / (e^0 + e^1).
/// let lp = softmax_layer::rank::log_prob(&[0.0, 1.0], &[1]).unwrap();
/// assert!((lp - (1f64 - (1f64.exp() + 1.0).ln())).abs() < 1e-12);
/// ```
pub fn log_prob(scores: &[f32], ranking: &[usize]) -> Result<f64> {
    check_scores(scores)?;
    check_ranking(scores.len(), ranking)?;
    let lse = position_lse(scores, ranking);
    Ok(sum_log_terms(scores, ranking, &lse))
}

/// `log P(ranking | scores)` and its gradient with respect to the scores (`[m]`).
pub fn log_prob_with_grad(scores: &[f32], ranking: &[usize]) -> Result<(f64, Vec<f64>)> {
    check_scores(scores)?;
    check_ranking(scores.len(), ranking)?;
    let lse = position_lse(scores, ranking);
    // q_p = log Σ_{i ≤ p} exp(a_p − lse_i) = log Σ_{i ≤ p} exp((a_p − a_i) − ρ_i) for each
    // position p (terms ≤ 0, since a_p ≤ a_i), by q_p = logaddexp(q_{p−1} + (a_p − a_{p−1}), −ρ_p).
    let mut q = Vec::with_capacity(lse.len());
    let mut prev: Option<(f64, f64)> = None;
    for &(a, rho) in &lse {
        let qp = match prev {
            None => -rho,
            Some((a0, q0)) => logaddexp(q0 + (a - a0), -rho),
        };
        q.push(qp);
        prev = Some((a, qp));
    }
    let k = ranking.len();
    let mut pos = vec![k - 1; scores.len()];
    let mut grad = vec![0f64; scores.len()];
    for (i, &r) in ranking.iter().enumerate() {
        pos[r] = i;
        grad[r] = 1.0;
    }
    // Σ_{i ≤ p(j)} exp(s_j − lse_i) = exp((s_j − a_p) + q_p), with s_j ≤ a_p (j ∈ R_p).
    for (j, g) in grad.iter_mut().enumerate() {
        let p = pos[j];
        *g -= ((scores[j] as f64 - lse[p].0) + q[p]).exp();
    }
    let lp = sum_log_terms(scores, ranking, &lse);
    Ok((lp, grad))
}

/// Samples a top-`k` ranking from Plackett–Luce(scores) by the Gumbel-top-k trick:
/// perturb each score by Gumbel noise and sort. Seeded: the same `seed` gives the same
/// ranking on every machine.
pub fn sample_gumbel_top_k(scores: &[f32], k: usize, seed: u64) -> Result<Vec<usize>> {
    check_scores(scores)?;
    if k == 0 || k > scores.len() {
        return Err(Error::InvalidArgument(format!("k = {k} must be in [1, {}]", scores.len())));
    }
    let mut rng = crate::rng::SplitMix64::new(seed);
    // Keys relative to the largest score, so that an offset shared by all (1e20) does not
    // round the noise away.
    let top = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s)) as f64;
    let mut keyed: Vec<(f64, usize)> = scores
        .iter()
        .enumerate()
        .map(|(j, &s)| {
            let u = rng.uniform_open();
            ((s as f64 - top) - (-u.ln()).ln(), j)
        })
        .collect();
    let cmp = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if k < keyed.len() {
        keyed.select_nth_unstable_by(k - 1, cmp);
        keyed.truncate(k);
    }
    keyed.sort_unstable_by(cmp);
    Ok(keyed.into_iter().map(|(_, j)| j).collect())
}

/// Options of [`fit`].
#[derive(Clone, Copy, Debug)]
pub struct FitOptions {
    /// L2 penalty `α/2·‖θ‖²` on the log-strengths; 0 is pure maximum likelihood.
    pub l2: f64,
    /// Stop when no log-strength moves by more than this in an iteration.
    pub tolerance: f64,
    pub max_iterations: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions { l2: 0.0, tolerance: 1e-10, max_iterations: 100_000 }
    }
}

/// The fitted log-strengths and how the fit went.
#[derive(Clone, Debug)]
pub struct Fit {
    /// `θ_j`, one per item; under pure maximum likelihood they are centred (mean 0), since
    /// strengths are identified only up to an additive constant.
    pub log_strengths: Vec<f64>,
    pub iterations: usize,
    /// The penalized log-likelihood at the end.
    pub objective: f64,
}

/// Hunter's (2004) condition for the maximum-likelihood fit to exist: the graph with an edge
/// `i → j` whenever a ranking puts `i` above `j` is strongly connected (consecutive items
/// suffice: the rest follow by transitivity). Returns the first item that item 0 cannot
/// reach (`true`: 0 is never above it by any chain) or that cannot reach 0 (`false`).
fn disconnected(rankings: &[Vec<usize>], m: usize) -> Option<(usize, bool)> {
    let (mut down, mut up) = (vec![Vec::new(); m], vec![Vec::new(); m]);
    for r in rankings {
        for w in r.windows(2) {
            down[w[0]].push(w[1]);
            up[w[1]].push(w[0]);
        }
    }
    let reach = |adj: &[Vec<usize>]| {
        let mut seen = vec![false; m];
        let mut stack = vec![0];
        seen[0] = true;
        while let Some(i) = stack.pop() {
            for &j in &adj[i] {
                if !std::mem::replace(&mut seen[j], true) {
                    stack.push(j);
                }
            }
        }
        seen
    };
    if let Some(j) = reach(&down).iter().position(|&s| !s) {
        return Some((j, false));
    }
    reach(&up).iter().position(|&s| !s).map(|j| (j, true))
}

fn not_identified(j: usize) -> Error {
    Error::InvalidArgument(format!(
        "item {j} appears in no ranking, so its strength is not identified; add an L2 prior (--l2)"
    ))
}

/// Fits Plackett–Luce log-strengths `θ` to observed rankings: the maximum of the
/// log-likelihood less `(α/2)·‖θ‖²`.
///
/// Each ranking orders the items it lists, best first; items it does not list did not take
/// part. (Item ids are `0..m`, with `m` the largest id + 1.) The gradient is
/// `w_j − S_j·e^{θ_j} − α·θ_j`, where `w_j` counts the times item `j` is chosen and
/// `S_j = Σ_{sets R ∋ j} 1 / Σ_{l∈R} e^{θ_l}`. With `α = 0`, Hunter's (2004)
/// minorize–maximize update `e^{θ_j} = w_j / S_j`, every step of which increases the
/// likelihood. With `α > 0`, where MM crawls when the prior is small (an item that always
/// wins sits near `log(w/α)`), L-BFGS on the same gradient.
///
/// Pure maximum likelihood needs every item to win at least once and the comparisons to be
/// connected; otherwise this is an error suggesting an L2 prior (`α > 0`), under which the
/// fit always exists and is unique.
pub fn fit(rankings: &[Vec<usize>], opts: &FitOptions) -> Result<Fit> {
    if rankings.is_empty() {
        return Err(Error::InvalidArgument("there are no rankings to fit".into()));
    }
    if !(opts.l2.is_finite() && opts.l2 >= 0.0) {
        return Err(Error::InvalidArgument(format!("the L2 penalty must be finite and >= 0, got {}", opts.l2)));
    }
    if !(opts.tolerance.is_finite() && opts.tolerance >= 0.0) {
        return Err(Error::InvalidArgument(format!("the tolerance must be finite and >= 0, got {}", opts.tolerance)));
    }
    let alpha = opts.l2;
    let largest = rankings.iter().flatten().max().copied().unwrap_or(0);
    if alpha == 0.0 {
        // Every item must appear: find the first that does not before allocating `m` of
        // anything (a stray huge id would otherwise ask for memory in proportion).
        let mut ids: Vec<usize> = rankings.iter().flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        if let Some(j) = ids.iter().enumerate().find(|&(i, &id)| i != id).map(|(i, _)| i) {
            return Err(not_identified(j));
        }
    }
    let m = largest.checked_add(1).filter(|&m| m <= isize::MAX as usize / 64).ok_or_else(|| {
        Error::InvalidArgument(format!("item id {largest} is too large: the items are 0..=largest id"))
    })?;
    let zeros =
        |what: &str| crate::matrix::try_filled(m, 0f64, || format!("the {what} of {m} items (the largest id + 1)"));
    for (i, r) in rankings.iter().enumerate() {
        check_ranking(m, r).map_err(|e| Error::InvalidArgument(format!("ranking {i}: {e}")))?;
    }
    // Wins per item (the last item of a ranking is not a choice).
    let mut wins = zeros("win counts")?;
    for r in rankings {
        r[..r.len() - 1].iter().for_each(|&j| wins[j] += 1.0);
    }
    if alpha == 0.0
        && let Some(j) = (0..m).find(|&j| wins[j] == 0.0)
    {
        return Err(Error::InvalidArgument(format!(
            "item {j} is never ranked above another item, so maximum likelihood does not exist; add an L2 prior (--l2)"
        )));
    }
    if alpha == 0.0
        && let Some((j, above)) = disconnected(rankings, m)
    {
        let a = if above { "above" } else { "below" };
        return Err(Error::InvalidArgument(format!(
            "the comparisons are not connected: no chain of rankings puts item {j} {a} item 0 (Hunter's \
             condition), so the strengths are not identified and maximum likelihood does not exist; add \
             an L2 prior (--l2)"
        )));
    }
    let objective = |theta: &[f64]| -> f64 {
        let mut ll = 0.0;
        for r in rankings {
            // Backward logaddexp over the suffixes, as in `log_prob`.
            let mut acc = f64::NEG_INFINITY;
            for &j in r.iter().rev() {
                acc = logaddexp(acc, theta[j]);
                ll += theta[j] - acc;
            }
        }
        ll - 0.5 * alpha * theta.iter().map(|t| t * t).sum::<f64>()
    };
    let mut theta = zeros("strengths")?;
    let mut s = zeros("sums")?;
    if alpha > 0.0 {
        // With a prior the objective is strictly concave and its optimum unique, but a small
        // prior makes minorize-maximize crawl (an item that always wins sits near
        // log(wins/α)): quasi-Newton steps on the same gradient instead.
        return fit_quasi_newton(rankings, &wins, theta, alpha, opts, objective);
    }
    for it in 1..=opts.max_iterations {
        choice_sums(rankings, &theta, &mut s);
        let mut moved = 0f64;
        for j in 0..m {
            // Hunter's MM step: the maximum of the minorizer, item by item.
            let new = (wins[j] / s[j]).ln();
            moved = moved.max((new - theta[j]).abs());
            theta[j] = new;
        }
        if !theta.iter().all(|t| t.is_finite()) {
            return Err(Error::InvalidArgument(
                "the fit diverged; the comparisons may be disconnected: add an L2 prior (--l2)".into(),
            ));
        }
        if moved <= opts.tolerance {
            if alpha == 0.0 {
                let mean = theta.iter().sum::<f64>() / m as f64;
                theta.iter_mut().for_each(|t| *t -= mean);
            }
            let objective = objective(&theta);
            return Ok(Fit { log_strengths: theta, iterations: it, objective });
        }
    }
    // (The data passed Hunter's condition above, so the optimum exists.)
    Err(Error::InvalidArgument(format!(
        "the fit did not converge in {} iterations: the optimum exists but is approached slowly; allow more \
         iterations or add an L2 prior (--l2)",
        opts.max_iterations
    )))
}

/// `S_j = Σ 1 / Σ_{l∈R} e^{θ_l}` over the choice sets `R` (a ranking's suffixes but its last
/// item alone) that hold item `j`, written into `s`. The log-likelihood's gradient is then
/// `w_j − S_j·e^{θ_j}`.
fn choice_sums(rankings: &[Vec<usize>], theta: &[f64], s: &mut [f64]) {
    s.iter_mut().for_each(|x| *x = 0.0);
    let mut inv = Vec::new();
    for r in rankings {
        // 1 / Σ_{l∈R_i} e^{θ_l} for the suffixes R_i, each added to its members.
        let mut acc = f64::NEG_INFINITY;
        inv.clear();
        for &j in r.iter().rev() {
            acc = logaddexp(acc, theta[j]);
            inv.push((-acc).exp());
        }
        inv.reverse(); // inv[i] for suffix R_i
        let mut cum = 0.0;
        for (i, &j) in r.iter().enumerate() {
            if i + 1 < r.len() {
                cum += inv[i];
            }
            s[j] += cum;
        }
    }
}

/// The penalized fit (`α > 0`) by L-BFGS (the training module's, in `f64`) on the negated
/// objective, from `theta`; converged when the largest gradient entry is at most
/// `opts.tolerance`, or when `f64` can no longer measure a decrease.
fn fit_quasi_newton(
    rankings: &[Vec<usize>],
    wins: &[f64],
    theta: Vec<f64>,
    alpha: f64,
    opts: &FitOptions,
    objective: impl Fn(&[f64]) -> f64,
) -> Result<Fit> {
    let m = theta.len();
    let eval = |t: &[f64]| -> crate::Result<(f64, Vec<f64>)> {
        let mut s = vec![0f64; m];
        choice_sums(rankings, t, &mut s);
        let g = (0..m).map(|j| -(wins[j] - s[j] * t[j].exp() - alpha * t[j])).collect();
        Ok((-objective(t), g))
    };
    let (f, g) = eval(&theta)?;
    let mut lb = crate::train::Lbfgs::new(theta, f, g);
    for it in 1..=opts.max_iterations {
        let (done, _) = crate::train::lbfgs_iteration(&mut lb, 10, opts.tolerance.max(f64::MIN_POSITIVE), eval)?;
        if done {
            return Ok(Fit { objective: -lb.f, log_strengths: lb.x, iterations: it });
        }
    }
    Err(Error::InvalidArgument(format!("the fit did not converge in {} iterations", opts.max_iterations)))
}

/// ListMLE through the layer: scores `s_i = W·h_i + b` for each query row `i` of `hidden`,
/// and the loss `L = −Σ_i log P(rankings[i] | s_i)` (each ranking a full or top-k ranking
/// of the `V` classes), with its gradients with respect to `hidden` (`[n, d]`), the weight
/// (in the layer's layout) and the bias (when the layer has one).
///
/// Materializes the `[n, V]` scores: meant for ranking a few queries at a time.
pub fn list_mle(
    layer: &crate::SoftmaxLayer<'_>,
    hidden: crate::MatRef<'_>,
    rankings: &[Vec<usize>],
) -> Result<(f64, crate::loss::Gradients)> {
    use crate::WeightLayout;
    let (n, d, v) = (hidden.rows(), layer.hidden_dim(), layer.vocab());
    if layer.weight().is_empty() {
        return Err(Error::InvalidArgument(
            "the gradients need f32 weights; this layer holds bf16 weights only".into(),
        ));
    }
    if rankings.len() != n {
        return Err(Error::Shape(format!("{} rankings for {n} rows of hidden; expected one per row", rankings.len())));
    }
    let mut scores = vec![0f32; n * v];
    layer.logits(hidden, crate::MatMut::new(&mut scores, n, v)?)?;
    let k = crate::Kernels::best();
    let w = layer.weight();
    let mut loss = 0f64;
    let mut gh = vec![0f32; n * d];
    let mut gw = vec![0f32; v * d];
    let mut gb = layer.bias().map(|_| vec![0f32; v]);
    for (i, r) in rankings.iter().enumerate() {
        let row = &scores[i * v..(i + 1) * v];
        let (lp, g) = log_prob_with_grad(row, r).map_err(|e| Error::InvalidArgument(format!("ranking {i}: {e}")))?;
        loss -= lp;
        let h = hidden.row(i);
        for (j, &gj) in g.iter().enumerate() {
            let dz = -gj as f32; // ∂L/∂s_ij
            if dz == 0.0 {
                continue;
            }
            match layer.layout() {
                WeightLayout::VocabMajor => {
                    k.axpy(&mut gh[i * d..(i + 1) * d], dz, &w[j * d..(j + 1) * d]);
                    k.axpy(&mut gw[j * d..(j + 1) * d], dz, h);
                }
                WeightLayout::HiddenMajor => {
                    for p in 0..d {
                        gh[i * d + p] += dz * w[p * v + j];
                        gw[p * v + j] += dz * h[p];
                    }
                }
            }
            if let Some(gb) = gb.as_mut() {
                gb[j] += dz;
            }
        }
    }
    Ok((loss, crate::loss::Gradients { hidden: gh, weight: gw, bias: gb }))
}
