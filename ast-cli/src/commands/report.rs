//! `ast-cli report`: a run's report as one HTML page (ast_train::report).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct ReportArgs {
    /// Run directory.
    #[arg(long)]
    pub(crate) run: PathBuf,
    /// Where to write the page (default: report.html in the run directory; its plots go to
    /// the run's plots/ either way).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

pub(crate) fn report(args: ReportArgs) -> Result<()> {
    if let Some(out) = &args.out {
        if out.is_dir() {
            bail!("{} is a directory: give --out a file name", out.display());
        }
    }
    let finished = args.run.join("summary.json").is_file();
    let page = ast_train::report::write_report(&args.run, args.out.as_deref(), finished)?;
    println!("{}", page.display());
    Ok(())
}
