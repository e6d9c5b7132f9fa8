//! Tensor shapes, the factored-axis rule of SPEC.md §2, and the iteration domains of the IR.
//!
//! Every value of the step IR lives on a [`Domain`]: the whole tensor, the tensor with the
//! largest axis (d0) removed (where the Adafactor "row" accumulators live), with d1 removed
//! ("column" accumulators), with both removed, or a single value per step. A value on a
//! smaller domain is broadcast along the axes it lacks when a larger one uses it.

use crate::error::{Error, Result};
use std::fmt;

/// Largest number of elements a tensor may have (2^40): beyond this, index arithmetic in the
/// generated code and the memory any machine has are both out of reach.
pub const MAX_ELEMENTS: u128 = 1 << 40;

/// Largest supported rank.
pub const MAX_RANK: usize = 16;

/// The shape of one parameter tensor, as the user gave it (0-d allowed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its dimensions; rejects too many axes and too many elements.
    ///
    /// A dimension may be 0 (a tensor with no elements, as PyTorch allows): such a shape is
    /// a valid parameter, which [`MuloOptimizer`](crate::optimizer::MuloOptimizer) accepts
    /// and leaves as it is, but no step program is compiled for it
    /// ([`compile_layout`](crate::compile_layout) refuses it), and the command line's
    /// [`parse`](Self::parse), whose shapes are compiled, refuses a 0.
    pub fn new(dims: Vec<usize>) -> Result<Self> {
        let text = dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let reject = |reason: String| Error::Shape {
            text: text.clone(),
            reason,
        };
        if dims.len() > MAX_RANK {
            return Err(reject(format!(
                "rank {} is over the maximum {MAX_RANK}",
                dims.len()
            )));
        }
        let product: u128 = dims.iter().map(|&d| d as u128).product();
        if product > MAX_ELEMENTS {
            return Err(reject(format!(
                "{product} elements is over the maximum 2^40 = {MAX_ELEMENTS}"
            )));
        }
        Ok(Shape(dims))
    }

    /// Parses `1024x512`, `768`, `16x8x3x3`, or `scalar` (a 0-d tensor).
    pub fn parse(text: &str) -> Result<Self> {
        let trimmed = text.trim();
        let reject = |reason: &str| Error::Shape {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        if trimmed.eq_ignore_ascii_case("scalar") || trimmed == "()" {
            return Ok(Shape(Vec::new()));
        }
        if trimmed.is_empty() {
            return Err(reject(
                "empty shape; write dimensions like 1024x512, 768 or 16x8x3x3",
            ));
        }
        let mut dims = Vec::new();
        for (axis, part) in trimmed.split(['x', 'X', ',']).enumerate() {
            let part = part.trim();
            if part.is_empty() {
                return Err(reject(&format!(
                    "dimension {axis} is missing; write dimensions like 1024x512"
                )));
            }
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(reject(&format!(
                    "dimension {axis} `{part}` is not a positive whole number"
                )));
            }
            let d: u128 = part
                .parse()
                .map_err(|_| reject(&format!("dimension {axis} `{part}` is too large")))?;
            if d == 0 {
                return Err(reject(&format!(
                    "dimension {axis} is 0: every dimension must be at least 1"
                )));
            }
            if d > MAX_ELEMENTS {
                return Err(reject(&format!(
                    "dimension {axis} is over the maximum of 2^40 elements"
                )));
            }
            dims.push(d as usize);
        }
        Shape::new(dims).map_err(|e| match e {
            Error::Shape { reason, .. } => reject(&reason),
            other => other,
        })
    }

    /// The dimensions as given (empty for a 0-d tensor).
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of elements (1 for a 0-d tensor, 0 when a dimension is 0).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Whether the tensor has no elements (a dimension is 0).
    pub fn is_empty(&self) -> bool {
        self.numel() == 0
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "scalar");
        }
        let parts: Vec<String> = self.0.iter().map(|d| d.to_string()).collect();
        write!(f, "{}", parts.join("x"))
    }
}

impl std::str::FromStr for Shape {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Shape::parse(s)
    }
}

/// The two axes the Adafactor accumulators are factored over (SPEC.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FactoredAxes {
    /// The largest axis: the row accumulators R are reduced over it.
    pub d0: usize,
    /// The second largest: the column accumulators C are reduced over it.
    pub d1: usize,
}

impl FactoredAxes {
    /// The default axes of a shape (SPEC.md §2): a stable ascending sort of the axes by size,
    /// d0 the last, d1 the one before (so among equal sizes the lower axis comes first).
    /// `None` for rank ≤ 1.
    pub fn stable(dims: &[usize]) -> Option<FactoredAxes> {
        if dims.len() < 2 {
            return None;
        }
        let mut order: Vec<usize> = (0..dims.len()).collect();
        order.sort_by_key(|&axis| dims[axis]);
        Some(FactoredAxes {
            d0: order[order.len() - 1],
            d1: order[order.len() - 2],
        })
    }

    /// Checks that `self` is a valid choice for a tensor of shape `dims`: rank ≥ 2, two
    /// different axes in range, d0 of the largest size and d1 of the largest size among the
    /// other axes (any order of tied axes is valid: that is what PyLO's unstable sort may pick).
    pub fn check(self, dims: &[usize]) -> std::result::Result<(), String> {
        let FactoredAxes { d0, d1 } = self;
        if dims.len() < 2 {
            return Err(format!(
                "factored axes ({d0}, {d1}) were given for a tensor of rank {}; only tensors \
                 of rank ≥ 2 are factored",
                dims.len()
            ));
        }
        if d0 >= dims.len() || d1 >= dims.len() {
            return Err(format!(
                "factored axes ({d0}, {d1}) are out of range for a tensor of rank {}",
                dims.len()
            ));
        }
        if d0 == d1 {
            return Err(format!("factored axes ({d0}, {d1}) are the same axis"));
        }
        let mut sorted = dims.to_vec();
        sorted.sort_unstable();
        let (largest, second) = (sorted[sorted.len() - 1], sorted[sorted.len() - 2]);
        if dims[d0] != largest || dims[d1] != second {
            return Err(format!(
                "factored axes ({d0}, {d1}) have sizes ({}, {}); d0 must be a largest axis \
                 (size {largest}) and d1 a largest of the others (size {second})",
                dims[d0], dims[d1]
            ));
        }
        Ok(())
    }
}

impl fmt::Display for FactoredAxes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.d0, self.d1)
    }
}

impl std::str::FromStr for FactoredAxes {
    type Err = Error;
    /// Parses `D0,D1` (as the CLI's `--factored-axes` takes it).
    fn from_str(text: &str) -> Result<Self> {
        let bad = || {
            Error::argument(
                "factored-axes",
                format!("`{text}` is not two axis numbers `D0,D1` (e.g. `0,1`)"),
            )
        };
        let (a, b) = text.split_once(',').ok_or_else(bad)?;
        Ok(FactoredAxes {
            d0: a.trim().parse().map_err(|_| bad())?,
            d1: b.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// Where a value of the IR lives: which axes of the tensor it varies along.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    /// One value per element of the tensor.
    Elem,
    /// One value per element of the tensor with axis d0 removed (the R accumulators).
    Row,
    /// One value per element of the tensor with axis d1 removed (the C accumulators).
    Col,
    /// One value per element of the tensor with d0 and d1 removed (the row-mean of R).
    Rest,
    /// One value per step (time features, normalization statistics, runtime scalars).
    Step,
}

impl Domain {
    /// All domains, largest first.
    pub const ALL: [Domain; 5] = [
        Domain::Elem,
        Domain::Row,
        Domain::Col,
        Domain::Rest,
        Domain::Step,
    ];

    /// The short name used in the IR's text form.
    pub fn name(self) -> &'static str {
        match self {
            Domain::Elem => "elem",
            Domain::Row => "row",
            Domain::Col => "col",
            Domain::Rest => "rest",
            Domain::Step => "step",
        }
    }

    /// Which of the two factored axes this domain has removed: (d0 removed, d1 removed).
    /// `Step` removes every axis and is handled separately.
    fn removes(self) -> (bool, bool) {
        match self {
            Domain::Elem => (false, false),
            Domain::Row => (true, false),
            Domain::Col => (false, true),
            Domain::Rest => (true, true),
            Domain::Step => (true, true),
        }
    }

    /// Whether a value on `smaller` can be broadcast to this domain (every axis of `smaller`
    /// is an axis of `self`).
    pub fn contains(self, smaller: Domain) -> bool {
        if smaller == Domain::Step {
            return true;
        }
        if self == Domain::Step {
            return false;
        }
        let (a0, a1) = self.removes();
        let (b0, b1) = smaller.removes();
        (b0 || !a0) && (b1 || !a1)
    }

    /// The smallest domain that contains both (the domain of an operation on them).
    pub fn join(self, other: Domain) -> Domain {
        if self.contains(other) {
            self
        } else if other.contains(self) {
            other
        } else {
            // Row and Col: only the whole tensor holds both.
            Domain::Elem
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A shape with its factored axes resolved: everything the IR needs to know about a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: Shape,
    dims: Vec<usize>,
    factored: Option<FactoredAxes>,
}

impl Layout {
    /// The layout of `shape` with the default factored axes (the stable order of SPEC.md §2);
    /// a 0-d tensor is stepped as one element (`dims() == [1]`).
    pub fn new(shape: Shape) -> Self {
        let factored = FactoredAxes::stable(shape.dims());
        Self::build(shape, factored)
    }

    /// The layout of `shape` with the factored axes `axes` (`None`: the default). An explicit
    /// pair must be valid for the shape ([`FactoredAxes::check`]): this is how a caller
    /// reproduces a PyLO run whose unstable sort ordered tied largest axes the other way.
    pub fn with_axes(shape: Shape, axes: Option<FactoredAxes>) -> Result<Self> {
        match axes {
            None => Ok(Self::new(shape)),
            Some(axes) => {
                axes.check(shape.dims()).map_err(|reason| Error::Shape {
                    text: shape.to_string(),
                    reason,
                })?;
                Ok(Self::build(shape, Some(axes)))
            }
        }
    }

    fn build(shape: Shape, factored: Option<FactoredAxes>) -> Self {
        let dims = if shape.dims().is_empty() {
            vec![1]
        } else {
            shape.dims().to_vec()
        };
        Layout {
            shape,
            dims,
            factored,
        }
    }

    /// The layout of a shard holding `rows` consecutive rows of axis 0 of this tensor (0 allowed):
    /// the same shape and factored axes, with `dims()[0] = rows`, so that its domain lengths,
    /// buffer lengths and broadcast maps are the shard's local ones. The factored axes stay
    /// those of the whole tensor. Only the staged steps build these (the CPU's
    /// [`crate::backend::cpu::CpuStaged`], the packed CUDA program's staged plans), after
    /// [`check_local_rows`](Self::check_local_rows).
    pub(crate) fn with_local_rows(&self, rows: usize) -> Layout {
        let mut local = self.clone();
        local.dims[0] = rows;
        local
    }

    /// Checks that `rows` rows of axis 0 can be a shard of this tensor: at most its rows, and
    /// the tensor not 0-d.
    pub(crate) fn check_local_rows(&self, rows: usize) -> std::result::Result<(), String> {
        if self.is_scalar() || rows > self.dims[0] {
            return Err(format!(
                "{rows} rows is not a shard of a {} tensor",
                self.shape()
            ));
        }
        Ok(())
    }

    /// Whether the tensor is 0-d: stepped as one element, its 28 features normalized together
    /// (SPEC.md §3.4).
    pub fn is_scalar(&self) -> bool {
        self.shape.dims().is_empty()
    }

    /// The shape as the user gave it.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions the step works on (`[1]` for a 0-d tensor).
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The factored axes, or `None` for a tensor of rank ≤ 1.
    pub fn factored(&self) -> Option<FactoredAxes> {
        self.factored
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The domains that exist for this tensor: all five when factored, else `Elem` and `Step`.
    pub fn domains(&self) -> Vec<Domain> {
        if self.factored.is_some() {
            Domain::ALL.to_vec()
        } else {
            vec![Domain::Elem, Domain::Step]
        }
    }

    /// Whether `domain` exists for this tensor.
    pub fn has_domain(&self, domain: Domain) -> bool {
        matches!(domain, Domain::Elem | Domain::Step) || self.factored.is_some()
    }

    /// The axes of `dims()` a domain keeps, in order.
    pub fn domain_axes(&self, domain: Domain) -> Vec<usize> {
        if domain == Domain::Step {
            return Vec::new();
        }
        let (drop0, drop1) = domain.removes();
        let f = self.factored;
        (0..self.dims.len())
            .filter(|&axis| match f {
                Some(f) => !(drop0 && axis == f.d0 || drop1 && axis == f.d1),
                None => true,
            })
            .collect()
    }

    /// The shape of a domain (the kept axes' sizes; empty for `Step`, and for `Rest` of a 2-d tensor).
    pub fn domain_shape(&self, domain: Domain) -> Vec<usize> {
        self.domain_axes(domain)
            .into_iter()
            .map(|a| self.dims[a])
            .collect()
    }

    /// Number of points of a domain.
    pub fn domain_len(&self, domain: Domain) -> usize {
        self.domain_shape(domain).iter().product()
    }

    /// The number of terms a mean from `from` onto `to` sums per point: the product of the
    /// axes `from` keeps and `to` drops (`domain_len(from) / domain_len(to)`, and still the
    /// right count when one of the other axes is empty, as on an empty shard).
    pub fn mean_count(&self, from: Domain, to: Domain) -> usize {
        let kept = self.domain_axes(to);
        self.domain_axes(from)
            .into_iter()
            .filter(|a| !kept.contains(a))
            .map(|a| self.dims[a])
            .product()
    }

    /// For every point of `big` (row-major), the index of the point of `small` it broadcasts from.
    /// `small` must be contained in `big`.
    pub fn broadcast_index(&self, big: Domain, small: Domain) -> Vec<usize> {
        debug_assert!(big.contains(small));
        let big_axes = self.domain_axes(big);
        let small_axes = self.domain_axes(small);
        // Row-major strides of `small`, placed on the axes of `big`.
        let mut stride_in_small = vec![0usize; big_axes.len()];
        let mut stride = 1usize;
        for &axis in small_axes.iter().rev() {
            let pos = big_axes
                .iter()
                .position(|&a| a == axis)
                .expect("small domain's axes are a subset of big's");
            stride_in_small[pos] = stride;
            stride *= self.dims[axis];
        }
        let sizes: Vec<usize> = big_axes.iter().map(|&a| self.dims[a]).collect();
        let total: usize = sizes.iter().product();
        let mut out = Vec::with_capacity(total);
        let mut coord = vec![0usize; sizes.len()];
        let mut index = 0usize;
        for _ in 0..total {
            out.push(index);
            // Advance the row-major coordinate, updating the small index incrementally.
            for k in (0..sizes.len()).rev() {
                coord[k] += 1;
                index += stride_in_small[k];
                if coord[k] < sizes[k] {
                    break;
                }
                index -= stride_in_small[k] * sizes[k];
                coord[k] = 0;
            }
        }
        out
    }
}

impl fmt::Display for Layout {
    /// The shape, and the factored axes where they are not the default (`32x32x3x3 with
    /// factored axes 0,1`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.shape)?;
        match self.factored {
            Some(axes) if Some(axes) != FactoredAxes::stable(self.shape.dims()) => {
                write!(f, " with factored axes {axes}")
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axes(dims: &[usize]) -> Option<(usize, usize)> {
        Layout::new(Shape::new(dims.to_vec()).unwrap())
            .factored()
            .map(|f| (f.d0, f.d1))
    }

    #[test]
    fn factored_axes_follow_spec_examples() {
        assert_eq!(axes(&[1024, 512]), Some((0, 1)));
        assert_eq!(axes(&[64, 256]), Some((1, 0)));
        assert_eq!(axes(&[48, 48]), Some((1, 0)));
        assert_eq!(axes(&[16, 8, 3, 3]), Some((0, 1)));
        assert_eq!(axes(&[1, 300]), Some((1, 0)));
        assert_eq!(axes(&[37]), None);
        assert_eq!(axes(&[]), None);
    }

    #[test]
    fn explicit_axes_are_checked() {
        let shape = Shape::new(vec![32, 32, 3, 3]).unwrap();
        assert_eq!(
            Layout::new(shape.clone()).factored(),
            Some(FactoredAxes { d0: 1, d1: 0 })
        );
        let tied = Layout::with_axes(shape.clone(), Some(FactoredAxes { d0: 0, d1: 1 })).unwrap();
        assert_eq!(tied.factored(), Some(FactoredAxes { d0: 0, d1: 1 }));
        assert_ne!(tied, Layout::new(shape.clone()));
        for (d0, d1, why) in [
            (0, 0, "same axis"),
            (0, 4, "out of range"),
            (0, 2, "d0 must be a largest"),
            (2, 3, "d0 must be a largest"),
        ] {
            let err = Layout::with_axes(shape.clone(), Some(FactoredAxes { d0, d1 }))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why) && err.contains("32x32x3x3"), "{err}");
        }
        let vector = Shape::new(vec![7]).unwrap();
        let err = Layout::with_axes(vector, Some(FactoredAxes { d0: 0, d1: 1 })).unwrap_err();
        assert!(err.to_string().contains("rank 1"), "{err}");
        assert!(Layout::with_axes(Shape::new(vec![]).unwrap(), None)
            .unwrap()
            .is_scalar());
        assert_eq!(
            "1, 0".parse::<FactoredAxes>().unwrap(),
            FactoredAxes { d0: 1, d1: 0 }
        );
        assert!("1".parse::<FactoredAxes>().is_err());
    }

    #[test]
    fn parse_accepts_and_rejects() {
        assert_eq!(Shape::parse("1024x512").unwrap().dims(), &[1024, 512]);
        assert_eq!(Shape::parse("768").unwrap().dims(), &[768]);
        assert_eq!(Shape::parse("16x8x3x3").unwrap().dims(), &[16, 8, 3, 3]);
        assert!(Shape::parse("scalar").unwrap().dims().is_empty());
        for bad in ["0x5", "1024x", "x", "-3", "", "12a", "1048576x1048577"] {
            let err = Shape::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
        assert!(Shape::parse("1048576x1048576").is_ok()); // exactly 2^40
    }

    #[test]
    fn broadcast_index_drops_removed_axes() {
        let layout = Layout::new(Shape::new(vec![2, 3]).unwrap()); // d0 = 1, d1 = 0
                                                                   // Row removes d0 (axis 1): R has shape [2]; element (i, j) reads R[i].
        assert_eq!(
            layout.broadcast_index(Domain::Elem, Domain::Row),
            vec![0, 0, 0, 1, 1, 1]
        );
        // Col removes d1 (axis 0): C has shape [3]; element (i, j) reads C[j].
        assert_eq!(
            layout.broadcast_index(Domain::Elem, Domain::Col),
            vec![0, 1, 2, 0, 1, 2]
        );
        assert_eq!(
            layout.broadcast_index(Domain::Row, Domain::Rest),
            vec![0, 0]
        );
        assert_eq!(layout.domain_len(Domain::Rest), 1);
    }

    #[test]
    fn domain_lattice() {
        assert!(Domain::Elem.contains(Domain::Row));
        assert!(Domain::Row.contains(Domain::Rest));
        assert!(!Domain::Row.contains(Domain::Col));
        assert_eq!(Domain::Row.join(Domain::Col), Domain::Elem);
        assert_eq!(Domain::Rest.join(Domain::Step), Domain::Rest);
    }
}
