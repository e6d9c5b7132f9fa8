//! Little-endian byte strings between Python and Rust: the form in which state tensors and
//! sharded partial sums cross the binding (Python wraps them with `torch.frombuffer`), in one
//! place for the single-process, CUDA and sharded classes.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// State tensors in PyLO's layout as they go to Python: `[(name, shape, f32 bytes)]`.
pub type PyloTensors<'py> = Vec<(String, Vec<usize>, Bound<'py, PyBytes>)>;

/// State tensors in PyLO's layout as values: `[(name, shape, values)]`.
pub type PyloValues = Vec<(String, Vec<usize>, Vec<f32>)>;

/// `values` as little-endian f32 bytes.
pub fn f32_bytes<'py>(py: Python<'py>, values: &[f32]) -> Bound<'py, PyBytes> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    PyBytes::new(py, &bytes)
}

/// `values` as little-endian f64 bytes.
pub fn f64_bytes<'py>(py: Python<'py>, values: &[f64]) -> Bound<'py, PyBytes> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    PyBytes::new(py, &bytes)
}

/// Little-endian f32 values of `bytes`, or an error naming `what` when the length is not a
/// whole number of values.
pub fn f32_values(what: &str, bytes: &[u8]) -> PyResult<Vec<f32>> {
    whole(what, bytes.len(), 4, "f32")?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Little-endian f64 values of `bytes`, or an error naming `what` when the length is not a
/// whole number of values.
pub fn f64_values(what: &str, bytes: &[u8]) -> PyResult<Vec<f64>> {
    whole(what, bytes.len(), 8, "f64")?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// PyLO-layout state tensors (`TensorState::to_pylo`'s form) for Python.
pub fn pylo_tensors(
    py: Python<'_>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> PyloTensors<'_> {
    tensors
        .into_iter()
        .map(|(n, shape, values)| {
            let bytes = f32_bytes(py, &values);
            (n, shape, bytes)
        })
        .collect()
}

fn whole(what: &str, len: usize, size: usize, ty: &str) -> PyResult<()> {
    if len.is_multiple_of(size) {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{what}: {len} bytes is not a whole number of {ty} values"
        )))
    }
}

/// PyLO-layout state tensors from Python (`[(name, shape, f32 bytes)]`) as values, each
/// checked to hold exactly its shape's count of f32 values.
pub fn pylo_values(tensors: Vec<(String, Vec<usize>, Vec<u8>)>) -> PyResult<PyloValues> {
    tensors
        .into_iter()
        .map(|(name, shape, bytes)| {
            let count: usize = shape.iter().product();
            if count * 4 != bytes.len() {
                return Err(PyValueError::new_err(format!(
                    "state `{name}`: shape {shape:?} does not hold {} bytes",
                    bytes.len()
                )));
            }
            let values = f32_values(&format!("state `{name}`"), &bytes)?;
            Ok((name, shape, values))
        })
        .collect()
}
