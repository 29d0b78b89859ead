//! `softmax-layer`: the command line, a thin layer over the library.
//!
//! Every failure prints one line on stderr and exits with status 2.

mod rows;
mod selfcheck;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "softmax-layer",
    version,
    about = "The parameterized softmax layer softmax(H·W + b): exact, fast, memory-frugal"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Softmax of each row of the logits, written as f32 .npy.
    Softmax(rows::RowArgs),
    /// Log-softmax of each row of the logits, written as f32 .npy.
    LogSoftmax(rows::RowArgs),
    /// Logsumexp of each row of the logits, written as f32 .npy of shape [n].
    Logsumexp(rows::RowArgs),
    /// Checks the row kernels against float64 on built-in data and prints their
    /// throughput next to a plain copy and a plain read of the same bytes.
    Selfcheck(selfcheck::SelfcheckArgs),
}

/// A failure: the one line printed on stderr.
pub struct Failure(pub String);

impl From<softmax_layer::Error> for Failure {
    fn from(e: softmax_layer::Error) -> Self {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // Keep usage errors to one line, like every other failure.
            let text = e.render().to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
            eprintln!("softmax-layer: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Softmax(a) => rows::run(rows::Op::Softmax, &a),
        Command::LogSoftmax(a) => rows::run(rows::Op::LogSoftmax, &a),
        Command::Logsumexp(a) => rows::run(rows::Op::Logsumexp, &a),
        Command::Selfcheck(a) => selfcheck::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("softmax-layer: error: {msg}");
            ExitCode::from(2)
        }
    }
}
