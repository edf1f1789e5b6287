//! The `sync-engine` command's subcommands. They use the library like any program would;
//! nothing here is part of the library's API.

pub mod ceiling;
pub mod demo;
pub mod diff;
pub mod offsets;
pub mod produce;
pub mod replay;
pub mod run;
pub mod verify;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar for long work on a terminal, hidden with `--quiet`.
pub fn progress_bar(total: u64, label: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let template = format!("{label:>10} [{{bar:40}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
