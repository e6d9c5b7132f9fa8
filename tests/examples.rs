//! The training examples really train: `examples/train_mlp.rs` is compiled into this test and
//! its `train` run with the bundled demo meta-network.

#[allow(dead_code)]
#[path = "../examples/train_mlp.rs"]
mod train_mlp;

use mulo::lopt::LearnedOptimizer;

#[test]
fn train_mlp_loss_falls() {
    let config = train_mlp::Config::default();
    let mut printed = 0;
    let curve = train_mlp::train(&LearnedOptimizer::demo(), &config, |s| {
        printed += 1;
        println!(
            "epoch {:>2}: loss {:.4}, accuracy {:.1}%",
            s.epoch,
            s.loss,
            100.0 * s.accuracy
        );
    })
    .unwrap();
    assert_eq!(curve.len(), config.epochs + 1);
    assert_eq!(printed, curve.len());
    let (first, last) = (&curve[0], curve.last().unwrap());
    assert!(
        last.loss < 0.5 * first.loss,
        "loss {} → {}: did not halve",
        first.loss,
        last.loss
    );
    // Three classes: chance is 33%; the blobs are separable to about 90%.
    assert!(last.accuracy > 0.85, "final accuracy {}", last.accuracy);
    assert!(curve.iter().all(|s| s.loss.is_finite() && s.skipped == 0));
}

#[test]
fn train_mlp_with_zero_lr_does_not_learn() {
    // The control: the same run with lr = 0 must leave the loss where it was, so the test
    // above measures the optimizer and not something else.
    let config = train_mlp::Config {
        epochs: 2,
        lr: 0.0,
        ..Default::default()
    };
    let curve = train_mlp::train(&LearnedOptimizer::demo(), &config, |_| {}).unwrap();
    assert_eq!(curve[0].loss, curve.last().unwrap().loss);
}
