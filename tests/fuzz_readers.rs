//! Fuzzed readers: valid inputs of each kind mulo reads from untrusted files are mutated
//! (bytes flipped, truncated, extended, overwritten; safetensors headers rewritten: dtypes,
//! shapes, offsets, metadata, tensors dropped or renamed; f32 payloads set to NaN, ±Inf and
//! extreme values; JSON values replaced) and fed to their reader.
//!
//! For every case: the reader returns (no panic, caught with `catch_unwind` on a worker
//! thread; no hang, the case fails after [`CASE_TIMEOUT`]); a rejected input's error names
//! the file; an accepted input is checked to be valid (shapes, finite values, and what was
//! read equals what the file holds). An accepted optimizer state is valid by the rules of
//! every state import ([`valid_state`], written out here independently of mulo's check):
//! finite, second moments and factored accumulators ≥ 0, momenta whose square is finite.
//!
//! `MULO_FUZZ_CASES` sets the number of cases per reader (default 256, the CI size; the
//! nightly-style run is `MULO_FUZZ_CASES=10000`). Every test prints its counts (accepted,
//! rejected) and its time.

mod common;

use common::{fixture_lopt, golden_dir};
use mulo::ir::Buffer;
use mulo::lopt::{LearnedOptimizer, MetaParams};
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use mulo::state::TensorState;
use mulo::trajectory::Trajectory;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A reader that takes longer than this on one input counts as hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(20);

fn cases() -> u32 {
    std::env::var("MULO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

// ---------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------

/// One change to a file's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    /// XOR one byte.
    Flip(Index, u8),
    /// Keep only a prefix.
    Truncate(Index),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite bytes at a position.
    Overwrite(Index, Vec<u8>),
    /// Insert bytes at a position.
    Insert(Index, Vec<u8>),
    /// Rewrite the safetensors header length (the first 8 bytes).
    HeaderLen(u64),
    /// Edit the safetensors header (JSON), keeping the data.
    Header(HeaderEdit),
    /// Set one aligned f32 of the data to a special value.
    Payload(Index, f32),
    /// Replace a JSON value (config/meta files).
    Json(JsonEdit),
}

/// An edit of the safetensors header.
#[derive(Clone, Debug)]
enum HeaderEdit {
    Dtype(Index, String),
    Shape(Index, Vec<u64>),
    Offsets(Index, u64, u64),
    ShiftOffsets(Index, i64),
    Metadata(Index, String),
    DropMetadata(Index),
    DropTensor(Index),
    RenameTensor(Index, String),
    DuplicateTensor(Index, String),
    /// Replace a tensor's whole entry by an arbitrary JSON value.
    Garbage(Index, Value),
}

/// An edit of a JSON object file.
#[derive(Clone, Debug)]
enum JsonEdit {
    Set(Index, Value),
    Add(String, Value),
    Remove(Index),
    Replace(Value),
}

fn special_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(-f32::NAN),
        Just(f32::from_bits(0x7fc0_1234)),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(f32::MAX),
        Just(f32::MIN),
        Just(f32::MIN_POSITIVE / 8.0),
        Just(-0.0f32),
        Just(-1.0f32),
        Just(1e30f32),
        any::<f32>(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(Value::from(0)),
        Just(Value::from(-1)),
        Just(Value::from(1u64 << 40)),
        Just(Value::from(u64::MAX)),
        (-1e40f64..1e40).prop_map(Value::from),
        prop_oneof![
            Just(0.5),
            Just(1.5),
            Just(-0.5),
            Just(1e39),
            Just(f64::MIN_POSITIVE)
        ]
        .prop_map(Value::from),
        "[a-zA-Z0-9_ .-]{0,12}".prop_map(Value::from),
        Just(Value::from("NaN")),
        Just(Value::from("inf")),
        Just(Value::from("F32")),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn dtype_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("F32"),
        Just("F16"),
        Just("BF16"),
        Just("F64"),
        Just("I32"),
        Just("I64"),
        Just("U8"),
        Just("BOOL"),
        Just("F8_E4M3"),
        Just("f32"),
        Just("XYZ"),
    ]
    .prop_map(str::to_string)
}

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..70,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2 + 1),
        1 => Just(1u64 << 32),
        1 => any::<u64>(),
    ]
}

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    prop_oneof![
        (any::<Index>(), dtype_name()).prop_map(|(i, d)| HeaderEdit::Dtype(i, d)),
        (any::<Index>(), prop::collection::vec(dim(), 0..5))
            .prop_map(|(i, s)| HeaderEdit::Shape(i, s)),
        (any::<Index>(), dim(), dim()).prop_map(|(i, a, b)| HeaderEdit::Offsets(i, a, b)),
        (any::<Index>(), -64i64..64).prop_map(|(i, d)| HeaderEdit::ShiftOffsets(i, d)),
        (
            any::<Index>(),
            prop_oneof![
                "[0-9a-z\\[\\], \":{}.-]{0,24}",
                Just("18446744073709551616".to_string()),
                Just("-1".to_string()),
                Just("[]".to_string()),
                Just("[0]".to_string()),
                Just("[3, 0]".to_string()),
                Just("[18446744073709551615, 2]".to_string()),
                Just("NaN".to_string()),
                Just("inf".to_string()),
                Just(r#"[{"name": "w", "shape": [18446744073709551615, 2]}]"#.to_string()),
            ]
        )
            .prop_map(|(i, v)| HeaderEdit::Metadata(i, v)),
        any::<Index>().prop_map(HeaderEdit::DropMetadata),
        any::<Index>().prop_map(HeaderEdit::DropTensor),
        (any::<Index>(), "[a-z0-9_./]{0,12}").prop_map(|(i, n)| HeaderEdit::RenameTensor(i, n)),
        (any::<Index>(), "[a-z0-9_./]{0,12}").prop_map(|(i, n)| HeaderEdit::DuplicateTensor(i, n)),
        (any::<Index>(), json_value()).prop_map(|(i, v)| HeaderEdit::Garbage(i, v)),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..64)
}

/// Mutations of a safetensors file.
fn safetensors_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        1 => bytes().prop_map(Mutation::Extend),
        1 => (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        1 => (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => prop_oneof![Just(0u64), Just(1), Just(7), Just(u64::MAX), Just(1 << 40), 0u64..20_000]
            .prop_map(Mutation::HeaderLen),
        6 => header_edit().prop_map(Mutation::Header),
        4 => (any::<Index>(), special_f32()).prop_map(|(i, v)| Mutation::Payload(i, v)),
    ]
}

/// Mutations of a JSON file.
fn json_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<Index>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        1 => bytes().prop_map(Mutation::Extend),
        1 => (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), json_value()).prop_map(|(i, v)| Mutation::Json(JsonEdit::Set(i, v))),
        1 => ("[a-z_]{1,16}", json_value()).prop_map(|(k, v)| Mutation::Json(JsonEdit::Add(k, v))),
        1 => any::<Index>().prop_map(|i| Mutation::Json(JsonEdit::Remove(i))),
        1 => json_value().prop_map(|v| Mutation::Json(JsonEdit::Replace(v))),
    ]
}

/// Splits a safetensors file into its header (as JSON) and its data, when it has that form.
fn split_safetensors(b: &[u8]) -> Option<(serde_json::Map<String, Value>, Vec<u8>)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let header = b.get(8..8usize.checked_add(n)?)?;
    let map: serde_json::Map<String, Value> = serde_json::from_slice(header).ok()?;
    Some((map, b[8 + n..].to_vec()))
}

fn join_safetensors(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

fn tensor_names(h: &serde_json::Map<String, Value>) -> Vec<String> {
    h.keys().filter(|k| *k != "__metadata__").cloned().collect()
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip(i, x) => {
            if !b.is_empty() {
                let at = i.index(b.len());
                b[at] ^= x;
            }
        }
        Mutation::Truncate(i) => {
            let keep = i.index(b.len().max(1));
            b.truncate(keep);
        }
        Mutation::Extend(extra) => b.extend(extra),
        Mutation::Overwrite(i, bytes) => {
            let at = i.index(b.len().max(1));
            for (k, v) in bytes.iter().enumerate() {
                if let Some(slot) = b.get_mut(at + k) {
                    *slot = *v;
                }
            }
        }
        Mutation::Insert(i, bytes) => {
            let at = i.index(b.len() + 1);
            b.splice(at..at, bytes.iter().copied());
        }
        Mutation::HeaderLen(n) => {
            if b.len() >= 8 {
                b[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
        Mutation::Payload(i, v) => {
            if let Some((h, data)) = split_safetensors(b) {
                let words = data.len() / 4;
                if words > 0 {
                    let start = b.len() - data.len();
                    let at = start + 4 * i.index(words);
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                let _ = h;
            }
        }
        Mutation::Header(edit) => {
            let Some((mut h, data)) = split_safetensors(b) else {
                return;
            };
            let names = tensor_names(&h);
            let pick = |i: &Index| (!names.is_empty()).then(|| names[i.index(names.len())].clone());
            // A tensor's entry, when it is still a JSON object (an earlier edit may have
            // replaced it by something else).
            fn entry<'a>(
                h: &'a mut serde_json::Map<String, Value>,
                n: &str,
            ) -> Option<&'a mut serde_json::Map<String, Value>> {
                h.get_mut(n).and_then(Value::as_object_mut)
            }
            match edit {
                HeaderEdit::Dtype(i, d) => {
                    if let Some(e) = pick(i).and_then(|n| entry(&mut h, &n)) {
                        e.insert("dtype".into(), Value::from(d.clone()));
                    }
                }
                HeaderEdit::Shape(i, s) => {
                    if let Some(e) = pick(i).and_then(|n| entry(&mut h, &n)) {
                        e.insert("shape".into(), Value::from(s.clone()));
                    }
                }
                HeaderEdit::Offsets(i, a, c) => {
                    if let Some(e) = pick(i).and_then(|n| entry(&mut h, &n)) {
                        e.insert("data_offsets".into(), Value::from(vec![*a, *c]));
                    }
                }
                HeaderEdit::ShiftOffsets(i, d) => {
                    if let Some(e) = pick(i).and_then(|n| entry(&mut h, &n)) {
                        if let Some(offs) = e.get_mut("data_offsets").and_then(Value::as_array_mut)
                        {
                            for o in offs.iter_mut() {
                                if let Some(v) = o.as_u64() {
                                    *o = Value::from(v.saturating_add_signed(*d));
                                }
                            }
                        }
                    }
                }
                HeaderEdit::Metadata(i, v) => {
                    if let Some(Value::Object(meta)) = h.get_mut("__metadata__") {
                        let keys: Vec<String> = meta.keys().cloned().collect();
                        if !keys.is_empty() {
                            meta.insert(keys[i.index(keys.len())].clone(), Value::from(v.clone()));
                        }
                    }
                }
                HeaderEdit::DropMetadata(i) => {
                    if let Some(Value::Object(meta)) = h.get_mut("__metadata__") {
                        let keys: Vec<String> = meta.keys().cloned().collect();
                        if !keys.is_empty() {
                            meta.remove(&keys[i.index(keys.len())]);
                        }
                    }
                }
                HeaderEdit::DropTensor(i) => {
                    if let Some(n) = pick(i) {
                        h.remove(&n);
                    }
                }
                HeaderEdit::RenameTensor(i, new) => {
                    if let Some(n) = pick(i) {
                        let v = h.remove(&n).unwrap();
                        h.insert(new.clone(), v);
                    }
                }
                HeaderEdit::DuplicateTensor(i, new) => {
                    if let Some(n) = pick(i) {
                        let v = h[&n].clone();
                        h.insert(new.clone(), v);
                    }
                }
                HeaderEdit::Garbage(i, v) => {
                    if let Some(n) = pick(i) {
                        h.insert(n, v.clone());
                    }
                }
            }
            *b = join_safetensors(&h, &data);
        }
        Mutation::Json(edit) => {
            let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(b) else {
                return;
            };
            let keys: Vec<String> = map.keys().cloned().collect();
            match edit {
                JsonEdit::Set(i, v) => {
                    if !keys.is_empty() {
                        map.insert(keys[i.index(keys.len())].clone(), v.clone());
                    }
                }
                JsonEdit::Add(k, v) => {
                    map.insert(k.clone(), v.clone());
                }
                JsonEdit::Remove(i) => {
                    if !keys.is_empty() {
                        map.remove(&keys[i.index(keys.len())]);
                    }
                }
                JsonEdit::Replace(v) => {
                    *b = serde_json::to_vec(v).unwrap();
                    return;
                }
            }
            *b = serde_json::to_vec(&Value::Object(map)).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

/// What a reader made of one input.
enum Outcome {
    /// Accepted, and the acceptance check passed (or failed with this message).
    Accepted(Result<(), String>),
    /// Rejected with this error message.
    Rejected(String),
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    rejected: AtomicUsize,
}

/// Runs `read` on a worker thread: a panic or a run longer than [`CASE_TIMEOUT`] fails the
/// case; so does a rejection whose message does not name `file`, or an accepted input whose
/// check failed.
fn run_case<S: Send + 'static>(
    state: &mut Option<S>,
    timeout: Duration,
    file: &str,
    counts: &Counts,
    read: impl FnOnce(&mut S) -> Outcome + Send + 'static,
) -> Result<(), TestCaseError> {
    let mut s = state.take().expect("reader state present");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&mut s)));
        let _ = tx.send((result, s));
    });
    let (result, s) = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => return Err(TestCaseError::fail(format!("reader hung (> {timeout:?})"))),
    };
    *state = Some(s);
    match result {
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(TestCaseError::fail(format!("reader panicked: {msg}")))
        }
        Ok(Outcome::Rejected(msg)) => {
            counts.rejected.fetch_add(1, Ordering::Relaxed);
            prop_assert!(
                msg.contains(file),
                "the error does not name the file `{file}`: {msg}"
            );
            Ok(())
        }
        Ok(Outcome::Accepted(check)) => {
            counts.accepted.fetch_add(1, Ordering::Relaxed);
            check.map_err(|why| TestCaseError::fail(format!("accepted an invalid input: {why}")))
        }
    }
}

/// Fuzzes one reader: `inputs` are the valid files (name, bytes) one of which each case
/// mutates; `read` gets the directory, the file name and the mutated bytes already written.
fn fuzz<S: Send + 'static>(
    reader: &str,
    inputs: Vec<(String, Vec<u8>, bool)>,
    state: S,
    read: fn(&mut S, &Path, &str) -> Outcome,
) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, _) in &inputs {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let counts = Arc::new(Counts::default());
    let state = std::cell::RefCell::new(Some(state));
    let started = Instant::now();
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        any::<Index>(),
        prop::collection::vec(prop_oneof![safetensors_mutation(), json_mutation()], 1..4),
    );
    let dir_path: PathBuf = dir.path().to_path_buf();
    let result = runner.run(&strategy, |(which, mutations)| {
        let (name, original, is_json) = &inputs[which.index(inputs.len())];
        let mut bytes = original.clone();
        for m in &mutations {
            // JSON files get JSON-level and byte-level mutations; safetensors files the rest.
            let fits = match m {
                Mutation::Json(_) => *is_json,
                Mutation::Header(_) | Mutation::Payload(..) | Mutation::HeaderLen(_) => !is_json,
                _ => true,
            };
            if fits {
                apply(&mut bytes, m);
            }
        }
        let path = dir_path.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let (d, f) = (dir_path.clone(), name.clone());
        let outcome = run_case(
            &mut state.borrow_mut(),
            CASE_TIMEOUT,
            name,
            &counts,
            move |s| read(s, &d, &f),
        );
        // Restore the valid file for the next case (another file may be mutated then).
        std::fs::write(&path, original).unwrap();
        outcome
    });
    let elapsed = started.elapsed();
    let (acc, rej) = (
        counts.accepted.load(Ordering::Relaxed),
        counts.rejected.load(Ordering::Relaxed),
    );
    println!(
        "fuzz {reader}: {} cases ({acc} accepted, {rej} rejected), 0 panics, 0 hangs, in {:.1?}",
        acc + rej,
        elapsed
    );
    if let Err(e) = result {
        panic!("fuzz {reader}: {e}");
    }
    assert_eq!(acc + rej, n as usize, "every case ran");
}

fn outcome<T>(r: mulo::Result<T>, check: impl FnOnce(T) -> Result<(), String>) -> Outcome {
    match r {
        Ok(v) => Outcome::Accepted(check(v)),
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn finite(what: &str, values: &[f32]) -> Result<(), String> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format!("{what} holds {} at {i}", values[i])),
        None => Ok(()),
    }
}

/// An imported state is valid: every value finite, `rms` and the factored accumulators
/// ≥ 0 (averages of squares), every `mom` value's square finite in f32 (an average of
/// gradients whose squares were finite).
fn valid_state(name: &str, state: &TensorState) -> Result<(), String> {
    for (buffer, values) in state.iter() {
        let what = format!("{name}/{}", buffer.name());
        finite(&what, values)?;
        let bad = match buffer {
            Buffer::Mom => values.iter().position(|m| !(m * m).is_finite()),
            _ => values.iter().position(|v| *v < 0.0),
        };
        if let Some(i) = bad {
            return Err(format!("{what} holds {:e} at {i}", values[i]));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The readers
// ---------------------------------------------------------------------------------------

#[test]
fn fuzz_weights() {
    let dir = golden_dir().join("weights");
    let inputs = ["model.safetensors", "config.json"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                std::fs::read(dir.join(n)).unwrap(),
                n.ends_with(".json"),
            )
        })
        .collect();
    fuzz("weights", inputs, (), |_, dir, _| {
        outcome(LearnedOptimizer::from_dir(dir), |lopt| {
            lopt.network.validate()?;
            // What was read is what the file holds: the network serializes back to tensors
            // equal to the file's, and the config (when read) agrees with it.
            let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
            let file = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
            let back_bytes = lopt.network.to_safetensors_bytes();
            let back = SafeTensors::deserialize(&back_bytes).unwrap();
            for (name, view) in back.tensors() {
                let theirs = file.tensor(&name).map_err(|e| e.to_string())?;
                if theirs.data() != view.data() || theirs.shape() != view.shape() {
                    return Err(format!("tensor `{name}` differs from the file"));
                }
            }
            if file.len() != back.len() {
                return Err("the file has extra tensors".into());
            }
            let config =
                mulo::lopt::read_config(&dir.join("config.json")).map_err(|e| e.to_string())?;
            if config != lopt.network.config() {
                return Err("config.json disagrees with the tensors".into());
            }
            Ok(())
        })
    });
}

#[test]
fn fuzz_trajectories() {
    let dir = golden_dir();
    let inputs = [
        "vec_37.safetensors",
        "vec_1.safetensors",
        "mat_1x300.safetensors",
        "scalar_0d.safetensors",
    ]
    .iter()
    .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap(), false))
    .collect();
    fuzz("trajectories", inputs, (), |_, dir, name| {
        outcome(Trajectory::load(&dir.join(name)), |t| {
            let n = t.layout.shape().numel();
            if t.p0.len() != n {
                return Err("p0 has the wrong length".into());
            }
            if t.grads.is_empty() || t.params.len() != t.grads.len() {
                return Err("steps and tensors disagree".into());
            }
            if t.params.last().unwrap().is_none() {
                return Err("the final parameter is missing".into());
            }
            finite("p0", &t.p0)?;
            for (k, g) in t.grads.iter().enumerate() {
                if g.len() != n {
                    return Err(format!("g{} has the wrong length", k + 1));
                }
                finite(&format!("g{}", k + 1), g)?;
            }
            for (k, p) in t.params.iter().enumerate() {
                if let Some(p) = p {
                    if p.len() != n {
                        return Err(format!("p{} has the wrong length", k + 1));
                    }
                    finite(&format!("p{}", k + 1), p)?;
                }
            }
            if let Some(s) = &t.final_state {
                for (b, v) in s.iter() {
                    finite(&format!("state {b:?}"), v)?;
                }
            }
            if !(t.lr.is_finite() && t.weight_decay.is_finite()) {
                return Err("lr or weight decay not finite".into());
            }
            Ok(())
        })
    });
}

fn fuzz_specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("w", &[6, 5]).unwrap(),
        ParamSpec::new("b", &[7]).unwrap(),
        ParamSpec::new("s", &[]).unwrap(),
    ]
}

/// An optimizer over [`fuzz_specs`] that has taken three steps.
fn stepped_optimizer() -> MuloOptimizer {
    let lopt = fixture_lopt();
    let mut opt = MuloOptimizer::new(&lopt, fuzz_specs(), OptimizerOptions::default()).unwrap();
    let mut params: Vec<Vec<f32>> = fuzz_specs()
        .iter()
        .map(|s| (0..s.shape.numel()).map(|i| 0.1 * i as f32 - 0.3).collect())
        .collect();
    for step in 0..3 {
        let grads: Vec<Vec<f32>> = params
            .iter()
            .map(|p| {
                p.iter()
                    .enumerate()
                    .map(|(i, v)| v * 0.5 + 0.01 * (i + step) as f32)
                    .collect()
            })
            .collect();
        let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
        let gs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        opt.step(&mut ps, &gs, 1e-2, 0.0).unwrap();
    }
    opt
}

#[test]
fn fuzz_checkpoints() {
    let opt = stepped_optimizer();
    let bytes = opt.checkpoint_bytes().unwrap();
    let name = "fuzz.ckpt".to_string();
    fuzz(
        "checkpoints",
        vec![(name, bytes, false)],
        opt,
        |opt, dir, name| {
            let path = dir.join(name);
            outcome(opt.load_checkpoint(&path), |()| {
                // Accepted: what the optimizer now holds is what the file holds, bit for bit
                // (saved again it is the same tensors, at the file's step), and every state
                // is valid.
                let file = std::fs::read(&path).unwrap();
                let file = SafeTensors::deserialize(&file).map_err(|e| e.to_string())?;
                let again = opt.checkpoint_bytes().map_err(|e| e.to_string())?;
                let again = SafeTensors::deserialize(&again).unwrap();
                for (key, view) in again.tensors() {
                    let theirs = file.tensor(&key).map_err(|e| e.to_string())?;
                    if theirs.data() != view.data() {
                        return Err(format!("tensor `{key}` differs from the file"));
                    }
                }
                let (_, header) = SafeTensors::read_metadata(&std::fs::read(&path).unwrap())
                    .map_err(|e| e.to_string())?;
                let step = header
                    .metadata()
                    .as_ref()
                    .and_then(|m| m.get("step").cloned());
                if step != Some(opt.step_count().to_string()) {
                    return Err(format!(
                        "step {} loaded, the file says {step:?}",
                        opt.step_count()
                    ));
                }
                for spec in fuzz_specs() {
                    let state = opt.state(&spec.name).map_err(|e| e.to_string())?;
                    valid_state(&spec.name, &state)?;
                    if state.step != opt.step_count() {
                        return Err("a tensor's step differs from the optimizer's".into());
                    }
                }
                Ok(())
            })
        },
    );
}

#[test]
fn fuzz_pylo_state_files() {
    let opt = stepped_optimizer();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for spec in fuzz_specs() {
        for (buf, shape, values) in opt.export_pylo_state(&spec.name).unwrap() {
            if shape.is_empty() {
                continue; // PyLO's file holds tensors with dim > 0 (see import_pylo_file)
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{}.{buf}", spec.name), shape, bytes));
        }
    }
    let bytes = serialize_f32(&tensors);
    // The unmutated file imports.
    let check_dir = tempfile::tempdir().unwrap();
    let check_path = check_dir.path().join("pylo_state.safetensors");
    std::fs::write(&check_path, &bytes).unwrap();
    let mut fresh = MuloOptimizer::new(&fixture_lopt(), fuzz_specs(), Default::default()).unwrap();
    fresh
        .import_pylo_file(&check_path, 3, |n, b| format!("{n}.{b}"))
        .expect("the valid PyLO state file imports");
    fuzz(
        "pylo-state",
        vec![("pylo_state.safetensors".to_string(), bytes, false)],
        fresh,
        |opt, dir, name| {
            outcome(
                opt.import_pylo_file(&dir.join(name), 3, |n, b| format!("{n}.{b}")),
                |()| {
                    for spec in fuzz_specs() {
                        let state = opt.state(&spec.name).map_err(|e| e.to_string())?;
                        valid_state(&spec.name, &state)?;
                    }
                    if opt.step_count() != 3 {
                        return Err("the step counter was not set".into());
                    }
                    Ok(())
                },
            )
        },
    );
}

#[test]
fn fuzz_meta_json() {
    let text = r#"{"exp_mult": 0.001, "step_mult": 0.01, "momentum_decays": [0.5, 0.9, 0.99], "rms_decay": 0.999, "adafactor_decays": [0.1, 0.9, 0.999]}"#;
    fuzz(
        "meta-json",
        vec![("meta.json".to_string(), text.as_bytes().to_vec(), true)],
        (),
        |_, dir, name| {
            outcome(MetaParams::from_json_file(&dir.join(name)), |meta| {
                meta.validate()?;
                // Accepted meta-parameters build a learned optimizer.
                LearnedOptimizer::new(
                    LearnedOptimizer::demo().network,
                    meta,
                    mulo::lopt::WeightsOrigin::Demo,
                )
                .map(drop)
                .map_err(|e| e.to_string())
            })
        },
    );
}

/// The harness itself: a panicking reader, a hanging one, an error that does not name the
/// file and an accepted input that fails its check are each reported as a failure.
#[test]
fn the_harness_catches_panics_hangs_unnamed_errors_and_invalid_acceptances() {
    let counts = Counts::default();
    // Long enough for a panic message and backtrace to print, short against the sleeper.
    let short = Duration::from_secs(3);
    let mut state = Some(());
    let fails = |r: Result<(), TestCaseError>, what: &str| {
        let msg = format!("{:?}", r.expect_err(what));
        assert!(msg.contains(what), "{msg}");
    };
    fails(
        run_case(&mut state, short, "f.bin", &counts, |_| {
            panic!("a deliberate panic: the harness self-test")
        }),
        "reader panicked",
    );
    state = Some(());
    fails(
        run_case(&mut state, short, "f.bin", &counts, |_| {
            std::thread::sleep(Duration::from_secs(30));
            Outcome::Rejected("f.bin".into())
        }),
        "reader hung",
    );
    state = Some(());
    fails(
        run_case(&mut state, short, "f.bin", &counts, |_| {
            Outcome::Rejected("bad header".into())
        }),
        "does not name the file",
    );
    fails(
        run_case(&mut state, short, "f.bin", &counts, |_| {
            Outcome::Accepted(Err("NaN".into()))
        }),
        "accepted an invalid input",
    );
    run_case(&mut state, short, "f.bin", &counts, |_| {
        Outcome::Rejected("f.bin: bad header".into())
    })
    .unwrap();
    run_case(&mut state, short, "f.bin", &counts, |_| {
        Outcome::Accepted(Ok(()))
    })
    .unwrap();
}

/// Inputs the fuzzing found accepted and invalid, kept as regression tests: a NaN or ±Inf in
/// a PyLO state file or a trajectory is refused, naming the file, the tensor and the index;
/// in a checkpoint, its data no longer matches its checksum (the value rules on checksummed
/// checkpoints are tested in `tests/checkpoint.rs`).
#[test]
fn non_finite_values_in_state_and_trajectory_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The f32 in the middle of the data section set to `value`.
    let poison = |bytes: &[u8], value: f32| {
        let mut b = bytes.to_vec();
        let (_, data) = split_safetensors(&b).unwrap();
        let at = b.len() - data.len() + 4 * (data.len() / 8);
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        b
    };
    let expect = |r: mulo::Result<()>, file: &str| {
        let msg = r.expect_err("a non-finite value was accepted").to_string();
        assert!(msg.contains(file) && msg.contains("non-finite"), "{msg}");
    };
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut opt = stepped_optimizer();
        let ckpt = dir.path().join("bad.ckpt");
        std::fs::write(&ckpt, poison(&opt.checkpoint_bytes().unwrap(), value)).unwrap();
        let before = opt.state("w").unwrap();
        let msg = opt
            .load_checkpoint(&ckpt)
            .expect_err("a non-finite value was accepted")
            .to_string();
        assert!(
            msg.contains("bad.ckpt") && msg.contains("tensor `") && msg.contains("checksum"),
            "{msg}"
        );
        assert_eq!(
            opt.state("w").unwrap(),
            before,
            "a refused checkpoint changed the state"
        );

        let traj = dir.path().join("bad_traj.safetensors");
        let golden = std::fs::read(golden_dir().join("vec_37.safetensors")).unwrap();
        std::fs::write(&traj, poison(&golden, value)).unwrap();
        expect(Trajectory::load(&traj).map(drop), "bad_traj.safetensors");
    }
    // A PyLO state file: the optimizer's own state exported, one value poisoned.
    let opt = stepped_optimizer();
    let (buf, shape, values) = opt.export_pylo_state("w").unwrap().remove(0);
    let mut tensors = vec![(format!("w.{buf}"), shape, values)];
    for spec in ["b", "s"] {
        for (buf, shape, values) in opt.export_pylo_state(spec).unwrap() {
            if !shape.is_empty() {
                tensors.push((format!("{spec}.{buf}"), shape, values));
            }
        }
    }
    for (buf, shape, values) in opt.export_pylo_state("w").unwrap().into_iter().skip(1) {
        tensors.push((format!("w.{buf}"), shape, values));
    }
    tensors[0].2[1] = f32::NAN;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, s, v)| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let path = dir.path().join("bad_pylo.safetensors");
    std::fs::write(&path, serialize_f32(&bytes)).unwrap();
    let mut fresh = MuloOptimizer::new(&fixture_lopt(), fuzz_specs(), Default::default()).unwrap();
    let msg = fresh
        .import_pylo_file(&path, 3, |n, b| format!("{n}.{b}"))
        .expect_err("a NaN PyLO state was imported")
        .to_string();
    assert!(
        msg.contains("bad_pylo.safetensors") && msg.contains("w.mom") && msg.contains("NaN"),
        "{msg}"
    );
}

/// A safetensors file (no metadata) of f32 tensors given as (name, shape, little-endian bytes).
fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}
