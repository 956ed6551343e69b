//! Tables printed by the CLI.

use anyhow::Result;
use ast_core::subnet::{layer_densities, overlap, LayerDensity};
use ast_core::SubnetTarget;
use ast_train::metrics::SubnetMetrics;
use ast_train::{RunSummary, TrainConfig};
use burn::prelude::*;

fn target(t: &SubnetTarget) -> String {
    match t {
        SubnetTarget::Density(d) => format!("density {d}"),
        SubnetTarget::Nm { n, m } => format!("{n}:{m}"),
    }
}

fn table(targets: &[SubnetTarget], metrics: &[SubnetMetrics]) {
    println!(
        "{:<7} {:<14} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "sub-net", "target", "density", "sparsity", "loss", "top-1", "top-5"
    );
    for m in metrics {
        println!(
            "{:<7} {:<14} {:>9.4} {:>8.2}% {:>8.4} {:>7.2}% {:>7.2}%",
            m.subnet,
            targets.get(m.subnet).map(target).unwrap_or_default(),
            m.density,
            100.0 * (1.0 - m.density),
            m.loss,
            100.0 * m.top1,
            100.0 * m.top5
        );
    }
}

/// The final per-sub-net table of a run.
pub fn print_summary(s: &RunSummary) {
    println!("after {} epochs ({:.0} s):", s.epochs, s.seconds);
    table(&s.targets, &s.subnets);
    println!(
        "best top-1 of the sparsest sub-net: {:.2}%",
        100.0 * s.best_sparsest_top1
    );
}

/// The table of `ast-cli eval`.
pub fn print_eval(config: &TrainConfig, epochs: usize, metrics: &[SubnetMetrics]) {
    println!(
        "{} on {} after {epochs} epochs:",
        config.model,
        config.data.path.display()
    );
    table(&config.ast.subnets, metrics);
}

/// Prints per-layer densities and overlaps; returns the CSV text.
pub fn stats<B: Backend, M: Module<B>>(model: &M, k: usize) -> Result<String> {
    let per_subnet = (0..k)
        .map(|s| layer_densities(model, s))
        .collect::<Result<Vec<_>, _>>()?;
    let pairs: Vec<(usize, usize)> = (0..k)
        .flat_map(|a| (a + 1..k).map(move |b| (a, b)))
        .collect();
    let overlaps = pairs
        .iter()
        .map(|&(a, b)| overlap(model, a, b))
        .collect::<Result<Vec<_>, _>>()?;
    let mut csv = String::from("layer,weights");
    let mut header = format!("{:<40} {:>9}", "layer", "weights");
    for s in 0..k {
        csv.push_str(&format!(",density_{s}"));
        header.push_str(&format!(" {:>9}", format!("dens {s}")));
    }
    for (a, b) in &pairs {
        csv.push_str(&format!(",iou_{a}_{b},containment_{a}_{b}"));
        header.push_str(&format!(" {:>9}", format!("IoU {a}-{b}")));
    }
    csv.push('\n');
    println!("{header}");
    for (l, layer) in per_subnet[0].iter().enumerate() {
        let mut line = format!("{:<40} {:>9}", layer.path, layer.total);
        csv.push_str(&format!("{},{}", layer.path, layer.total));
        for d in &per_subnet {
            line.push_str(&format!(" {:>9.4}", d[l].density()));
            csv.push_str(&format!(",{}", d[l].density()));
        }
        for o in &overlaps {
            line.push_str(&format!(" {:>9.4}", o[l].iou()));
            csv.push_str(&format!(",{},{}", o[l].iou(), o[l].containment()));
        }
        println!("{line}");
        csv.push('\n');
    }
    for note in empty_layers(&per_subnet) {
        eprintln!("note: {note}");
    }
    Ok(csv)
}

/// The layers a sub-net keeps no weight of (its output there does not depend on the input):
/// global magnitude pruning empties a layer whose weights are all smaller than the others'.
fn empty_layers(per_subnet: &[Vec<LayerDensity>]) -> Vec<String> {
    let mut notes = Vec::new();
    for (k, layers) in per_subnet.iter().enumerate() {
        for layer in layers.iter().filter(|l| l.active == 0) {
            notes.push(format!(
                "sub-net {k} keeps none of the {} weights of {}: its output there does not \
                 depend on the input (the global magnitude threshold of the ramp emptied it)",
                layer.total, layer.path
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sub_net_without_a_layer_is_named() {
        let layer = |path: &str, active| LayerDensity {
            path: path.into(),
            active,
            total: 10,
        };
        let per_subnet = vec![
            vec![layer("conv", 3), layer("linear", 2)],
            vec![layer("conv", 1), layer("linear", 0)],
        ];
        let notes = empty_layers(&per_subnet);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("sub-net 1 keeps none of the 10 weights of linear:"),
            "{notes:?}"
        );
    }
}
