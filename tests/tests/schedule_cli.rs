//! `ast-cli schedule`: a run's mask-event timeline from its configuration alone.

use ast_tests::{cli, stderr};

#[test]
fn the_cifar_recipe_has_the_original_event_count_and_clock() {
    let output = cli(&["schedule", "--recipe", "cifar-unstructured", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 160 epochs × 391 iterations, update frequency 999, offset 100, K = 3: every sub-net has
    // an event every 999 global iterations of its counter, 62 per sub-net (the original's 186).
    assert_eq!(events.len(), 186);
    // Sub-net k's counter is delayed by k·(3·100 + 1) = 301k iterations.
    for (k, e) in events.iter().take(3).enumerate() {
        assert_eq!(e["iteration"], 999 + 301 * k);
        assert_eq!(e["subnet"], k);
        assert_eq!(e["kind"], "ramp");
    }
    // The ramp ends after c_1 = ⌊110·391/999⌋ = 43 events at the final density.
    let last_ramp = events
        .iter()
        .rfind(|e| e["subnet"] == 0 && e["kind"] == "ramp")
        .unwrap();
    assert_eq!(last_ramp["prune_counter"], 43 * 999);
    let density = last_ramp["target_density"].as_f64().unwrap();
    assert!((density - 0.1).abs() < 1e-12, "{density}");
}

#[test]
fn a_schedule_that_never_reaches_a_density_is_an_error() {
    // 22 000 / 64 = 344 iterations per epoch, ramp over one epoch: update frequency 400 has no
    // event inside the ramp.
    let output = cli(&[
        "schedule",
        "--recipe",
        "quickstart",
        "--update-frequency",
        "400",
    ]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("never gives sub-net 0 its final density"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
