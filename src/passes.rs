//! Rewrites of the step IR that keep its meaning and make it cheaper to run.
//!
//! - [`hoist_dense_inputs`]: a dense layer whose input mixes domains (the first layer sees
//!   per-element features, per-row R features, per-column C features and per-step time
//!   features) is split into one partial product per domain, each computed where its inputs
//!   live and then broadcast and summed (SPEC.md §5: 736 fewer multiply-adds per element for
//!   μLO_M).
//! - [`eliminate_dead_code`]: drops nodes and matrices no store depends on.

use crate::error::Result;
use crate::ir::{verify, Binary, Matrix, MatrixId, Node, Op, StepIr, ValueId};
use crate::shape::Domain;
use std::collections::BTreeMap;

/// Runs every pass in order, verifying the IR after each.
pub fn optimize(ir: StepIr) -> Result<StepIr> {
    let ir = hoist_dense_inputs(ir);
    verify(&ir)?;
    let ir = eliminate_dead_code(ir);
    verify(&ir)?;
    Ok(ir)
}

/// Copies nodes into a new IR, remapping operands.
struct Rewriter {
    nodes: Vec<Node>,
    map: Vec<ValueId>,
}

impl Rewriter {
    fn push(&mut self, op: Op, domain: Domain, width: u32, note: Option<String>) -> ValueId {
        self.nodes.push(Node {
            op,
            domain,
            width,
            note,
        });
        ValueId(self.nodes.len() as u32 - 1)
    }

    fn remap(&self, op: &Op) -> Op {
        let m = |v: &ValueId| self.map[v.index()];
        match op {
            Op::Load { .. } | Op::Scalar(_) | Op::Const(_) => op.clone(),
            Op::Unary(u, a) => Op::Unary(*u, m(a)),
            Op::Binary(b, x, y) => Op::Binary(*b, m(x), m(y)),
            Op::Mean(a) => Op::Mean(m(a)),
            Op::Pack(xs) => Op::Pack(xs.iter().map(m).collect()),
            Op::Dense { matrix, x } => Op::Dense {
                matrix: *matrix,
                x: m(x),
            },
            Op::Lane { x, lane } => Op::Lane {
                x: m(x),
                lane: *lane,
            },
            Op::Store {
                buffer,
                lane,
                value,
            } => Op::Store {
                buffer: *buffer,
                lane: *lane,
                value: m(value),
            },
        }
    }
}

/// Splits every dense layer whose packed input spans several domains into per-domain partial
/// products. The bias goes with the smallest domain's part, so it too is added once per point
/// of that domain rather than once per element.
pub fn hoist_dense_inputs(ir: StepIr) -> StepIr {
    let StepIr {
        layout,
        nodes,
        mut matrices,
        lopt_fingerprint,
    } = ir;
    let mut rw = Rewriter {
        nodes: Vec::with_capacity(nodes.len()),
        map: Vec::with_capacity(nodes.len()),
    };
    for node in &nodes {
        let mixed_pack = match &node.op {
            Op::Dense { matrix, x } => match &nodes[x.index()].op {
                Op::Pack(xs) => {
                    let mut groups: BTreeMap<Domain, Vec<(usize, ValueId)>> = BTreeMap::new();
                    for (col, &v) in xs.iter().enumerate() {
                        groups
                            .entry(nodes[v.index()].domain)
                            .or_default()
                            .push((col, rw.map[v.index()]));
                    }
                    (groups.len() > 1).then_some((*matrix, groups))
                }
                _ => None,
            },
            _ => None,
        };
        let new_id = match mixed_pack {
            None => {
                let op = rw.remap(&node.op);
                rw.push(op, node.domain, node.width, node.note.clone())
            }
            Some((matrix_id, groups)) => {
                let full = matrices[matrix_id.0 as usize].clone();
                let smallest = *groups.keys().next_back().expect("at least two groups");
                let mut partials: Vec<(Domain, ValueId)> = Vec::new();
                for (domain, cols) in &groups {
                    let weight = (0..full.rows)
                        .flat_map(|r| cols.iter().map(move |&(c, _)| (r, c)))
                        .map(|(r, c)| full.w(r, c))
                        .collect();
                    let first = cols.first().map_or(0, |c| c.0);
                    let last = cols.last().map_or(0, |c| c.0);
                    matrices.push(Matrix {
                        rows: full.rows,
                        cols: cols.len(),
                        weight,
                        bias: if *domain == smallest {
                            full.bias.clone()
                        } else {
                            None
                        },
                        label: format!(
                            "{}, the {} columns of {}..={} on {domain}",
                            full.label,
                            cols.len(),
                            first,
                            last
                        ),
                    });
                    let part_matrix = MatrixId(matrices.len() as u32 - 1);
                    let pack = rw.push(
                        Op::Pack(cols.iter().map(|&(_, v)| v).collect()),
                        *domain,
                        cols.len() as u32,
                        None,
                    );
                    let part = rw.push(
                        Op::Dense {
                            matrix: part_matrix,
                            x: pack,
                        },
                        *domain,
                        full.rows as u32,
                        Some(format!("{} on {domain}", full.label)),
                    );
                    partials.push((*domain, part));
                }
                // Sum from the smallest domain up, so each addition happens where it is cheapest.
                partials.reverse();
                let (mut acc_domain, mut acc) = partials[0];
                for &(domain, part) in &partials[1..] {
                    acc_domain = acc_domain.join(domain);
                    acc = rw.push(
                        Op::Binary(Binary::Add, acc, part),
                        acc_domain,
                        full.rows as u32,
                        None,
                    );
                }
                rw.nodes[acc.index()].note = node.note.clone();
                acc
            }
        };
        rw.map.push(new_id);
    }
    StepIr {
        layout,
        nodes: rw.nodes,
        matrices,
        lopt_fingerprint,
    }
}

/// Removes nodes no store depends on, and matrices no node uses.
pub fn eliminate_dead_code(ir: StepIr) -> StepIr {
    let mut live = vec![false; ir.nodes.len()];
    for i in (0..ir.nodes.len()).rev() {
        if matches!(ir.nodes[i].op, Op::Store { .. }) {
            live[i] = true;
        }
        if live[i] {
            for operand in ir.nodes[i].op.operands() {
                live[operand.index()] = true;
            }
        }
    }
    let mut matrix_map: BTreeMap<MatrixId, MatrixId> = BTreeMap::new();
    let mut matrices = Vec::new();
    let mut rw = Rewriter {
        nodes: Vec::new(),
        map: vec![ValueId(u32::MAX); ir.nodes.len()],
    };
    for (i, node) in ir.nodes.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let mut op = rw.remap(&node.op);
        if let Op::Dense { matrix, .. } = &mut op {
            let next = MatrixId(matrices.len() as u32);
            let new = *matrix_map.entry(*matrix).or_insert_with(|| {
                matrices.push(ir.matrices[matrix.0 as usize].clone());
                next
            });
            *matrix = new;
        }
        rw.map[i] = rw.push(op, node.domain, node.width, node.note.clone());
    }
    StepIr {
        layout: ir.layout,
        nodes: rw.nodes,
        matrices,
        lopt_fingerprint: ir.lopt_fingerprint,
    }
}
