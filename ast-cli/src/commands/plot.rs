//! `ast-cli plot`: a run's plots as SVG files (ast_train::plot).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct PlotArgs {
    /// Run directory (the main run: its density and per-layer plots).
    #[arg(long)]
    pub(crate) run: PathBuf,
    /// Other run directories, overlaid on the accuracy, loss and learning-rate plots.
    #[arg(long, num_args = 1.., value_name = "DIR")]
    pub(crate) compare: Vec<PathBuf>,
    /// Where to write the SVG files (default: plots/ in the run directory). Files of the same
    /// names there are replaced; nothing else is touched.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

pub(crate) fn plot(args: PlotArgs) -> Result<()> {
    let out = args
        .out
        .unwrap_or_else(|| args.run.join(ast_train::plot::PLOTS_DIR));
    if out.exists() && !out.is_dir() {
        bail!(
            "{} is not a directory: give --out a directory",
            out.display()
        );
    }
    let runs = std::iter::once(&args.run)
        .chain(&args.compare)
        .map(|dir| ast_train::plot::read_run(dir))
        .collect::<Result<Vec<_>, _>>()?;
    for run in &runs {
        for note in &run.notes {
            eprintln!("note: {}: {note}", run.name);
        }
    }
    for (path, _) in ast_train::plot::write_plots(&runs, &out)? {
        println!("{}", path.display());
    }
    Ok(())
}
