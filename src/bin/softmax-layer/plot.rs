//! A loss curve as a self-contained SVG file: no plotting dependency, opens in any browser.

use std::fmt::Write;

/// One line of the plot: a name, a colour and its points `(x, y)`.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// "Nice" tick values covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / want as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= want as f64).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else {
        format!("{}", (v * 1e4).round() / 1e4)
    }
}

/// Renders the series on shared axes, with a legend and optional horizontal reference lines.
pub fn svg(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>], refs: &[(&str, f64)]) -> String {
    let (w, h, ml, mr, mt, mb) = (800.0, 480.0, 70.0, 20.0, 40.0, 50.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    for &(_, r) in refs {
        (y0, y1) = (y0.min(r), y1.max(r));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let sy = |y: f64| mt + (y1 - y) / (y1 - y0) * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>
"#,
        w / 2.0,
        escape(title)
    );
    for t in ticks(y0, y1, 6) {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - mr,
            ml - 6.0,
            y + 4.0,
            label(t)
        );
    }
    for t in ticks(x0, x1, 8) {
        let x = sx(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{mt}" y2="{}" stroke="#f0f0f0"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - mb,
            h - mb + 16.0,
            label(t)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{}" height="{}" fill="none" stroke="#444"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"##,
        w - ml - mr,
        h - mt - mb,
        (ml + w - mr) / 2.0,
        h - 12.0,
        escape(x_label),
        (mt + h - mb) / 2.0,
        escape(y_label)
    );
    for (name, r) in refs {
        let y = sy(*r);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#888" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            w - mr,
            w - mr - 4.0,
            y - 4.0,
            escape(name)
        );
    }
    for (i, ser) in series.iter().enumerate() {
        let path: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                ser.color,
                path.join(" ")
            );
        }
        let ly = mt + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - mr - 170.0,
            w - mr - 145.0,
            ser.color,
            w - mr - 140.0,
            ly + 4.0,
            escape(ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
