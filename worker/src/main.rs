//! `llmops-worker`: one binary, one mode per subcommand, each taking an Assignment.
#![deny(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    pin_threads(cli.threads());
    init_logs();
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cli::EXIT_INVALID)
        }
    }
}

/// Logs go to stderr: JSON lines when `LLMOPS_LOG_FORMAT=json` (for log collectors),
/// else text; `RUST_LOG` filters them (default `info`).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if std::env::var("LLMOPS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Fixes the number of compute threads in `RAYON_NUM_THREADS`, which candle reads on every
/// matrix product: unset, it counts the physical cores by reading /proc/cpuinfo each time
/// (about 5% of decoding time, measured with perf), and its quantized products ignore the
/// rayon pool size. The default stays candle's own: one thread per physical core.
#[allow(unsafe_code)]
fn pin_threads(requested: Option<usize>) {
    if requested.is_none() && std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let threads = requested.unwrap_or_else(num_cpus::get_physical).max(1);
    // SAFETY: this runs first in main, before any other thread exists, so nothing can read
    // the environment while it changes.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
}
