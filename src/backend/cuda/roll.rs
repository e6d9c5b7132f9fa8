//! Rolling of isomorphic regions of a small kernel into one loop.
//!
//! A small kernel is a sequence of regions (a mean, a group of pointwise nodes, a store, each
//! a brace-enclosed block of C followed by its barrier, if any), and many of them are the same
//! code up to buffer offsets and domain sizes: the 16 feature means of a stage, each followed
//! by its `+ eps` and `rsqrt`, or the Adafactor factors of the three decays. [`roll`] finds
//! runs of consecutive units (a unit: `period` consecutive regions) whose rendered text is
//! identical up to integer and float literals and the names of their registers, and emits
//! each run as one `#pragma unroll 1` loop over its units. A literal that differs between the units
//! becomes `a + b * mulo_i` where it is an integer stepping evenly, else a column of a small
//! `__constant__` table (`int`, `float` or `double`, the literals' own text) indexed by the
//! loop variable (`mulo_i`; `mulo_j` for runs of nodes inside one region). Every unit runs the
//! same operations in the same order on the same values as before, so results stay bitwise the
//! same; only the PTX shrinks.
//!
//! Generic: it compares the regions' token streams, it does not know what they compute. Two
//! regions match only where every token other than a literal is equal and their
//! registers (`vN`, all declared inside the region) correspond one to one; the size or index
//! of a register array (`vN[3]`) and preprocessor lines must be equal as well.

use std::collections::BTreeMap;
use std::fmt::Write;

/// The most regions a repeating unit may have.
const MAX_PERIOD: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Blanks (kept in the output, ignored by the comparison).
    Space,
    /// A `//` comment to the end of the line (dropped from a rolled body).
    Comment,
    /// A decimal integer literal.
    Int,
    /// A floating-point literal: `f32` with an `f` suffix, else `f64`.
    Float,
    /// A register `vN`.
    Reg,
    /// Any other token: an identifier, another literal, a punctuation character, a
    /// preprocessor line.
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
}

fn tokens(text: &str) -> Vec<Tok> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        let start = i;
        let c = b[i];
        let kind = if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            Kind::Space
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            Kind::Comment
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            Kind::Other
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && word(b[i]) {
                i += 1;
            }
            let t = &text[start..i];
            if t.len() > 1 && t.starts_with('v') && t[1..].bytes().all(|d| d.is_ascii_digit()) {
                Kind::Reg
            } else {
                Kind::Other
            }
        } else if c.is_ascii_digit() {
            // A number: digits, letters, dots, and a sign right after an exponent's `e`.
            while i < b.len()
                && (word(b[i])
                    || b[i] == b'.'
                    || (b[i] == b'+' || b[i] == b'-')
                        && matches!(b[i - 1], b'e' | b'E')
                        && !text[start..i].starts_with("0x"))
            {
                i += 1;
            }
            let t = &text[start..i];
            if t.bytes().all(|d| d.is_ascii_digit()) && t.parse::<i64>().is_ok() {
                Kind::Int
            } else if !t.starts_with("0x")
                && t.trim_end_matches('f').parse::<f64>().is_ok()
                && t.contains(['.', 'e'])
            {
                Kind::Float
            } else {
                Kind::Other
            }
        } else {
            i += 1;
            Kind::Other
        };
        out.push(Tok {
            kind,
            start,
            end: i,
        });
    }
    out
}

/// A literal of a unit: its text, and whether it may differ between units.
#[derive(Clone, Copy, Debug)]
struct Lit<'a> {
    kind: Kind,
    text: &'a str,
    free: bool,
    tok: Tok,
}

/// A unit's text reduced to what must be equal: the non-blank tokens, registers numbered by
/// first appearance, literals as placeholders (listed in `lits`).
#[derive(Debug)]
struct Canon<'a> {
    shape: Vec<(Kind, &'a str, usize)>,
    lits: Vec<Lit<'a>>,
}

fn canon(text: &str) -> Canon<'_> {
    let mut shape = Vec::new();
    let mut lits = Vec::new();
    let mut regs: Vec<&str> = Vec::new();
    let toks: Vec<Tok> = tokens(text)
        .into_iter()
        .filter(|t| !matches!(t.kind, Kind::Space | Kind::Comment))
        .collect();
    for (i, t) in toks.iter().enumerate() {
        let s = &text[t.start..t.end];
        match t.kind {
            Kind::Reg => {
                let n = regs.iter().position(|r| *r == s).unwrap_or_else(|| {
                    regs.push(s);
                    regs.len() - 1
                });
                shape.push((Kind::Reg, "", n));
            }
            Kind::Int | Kind::Float => {
                // The size or index of a register array stays a literal.
                let fixed = i >= 2
                    && &text[toks[i - 1].start..toks[i - 1].end] == "["
                    && toks[i - 2].kind == Kind::Reg;
                lits.push(Lit {
                    kind: t.kind,
                    text: s,
                    free: !fixed,
                    tok: *t,
                });
                // An f32 literal and an f64 one never stand for each other.
                let f32 = t.kind == Kind::Float && s.ends_with('f');
                shape.push((t.kind, if f32 { "f" } else { "" }, 0));
            }
            k => shape.push((k, s, 0)),
        }
    }
    Canon { shape, lits }
}

/// Whether units `a` and `b` are the same code up to the literals that may differ.
fn same(a: &Canon<'_>, b: &Canon<'_>) -> bool {
    a.shape == b.shape
        && a.lits.len() == b.lits.len()
        && a.lits
            .iter()
            .zip(&b.lits)
            .all(|(x, y)| x.free && y.free || x.text == y.text)
}

/// The C expression of a literal whose values over the units are `values` (`kind` `Int` or
/// `Float`): `a + b * index` for integers stepping evenly, else a column of `table` (an
/// element type and its columns, each the literals of one position).
fn column(
    index: &str,
    kind: Kind,
    values: &[&str],
    table: &str,
    tables: &mut BTreeMap<&'static str, Vec<Vec<String>>>,
) -> String {
    let ty = if kind == Kind::Int {
        let ints: Vec<i64> = values.iter().map(|v| v.parse().expect("an i64")).collect();
        let (v0, step) = (ints[0], ints[1] - ints[0]);
        // `int` arithmetic where every value and every step taken fits.
        let span = (ints.len() as i64 - 1).checked_mul(step);
        let small = ints.iter().all(|&v| i32::try_from(v).is_ok())
            && span.is_some_and(|x| i32::try_from(x).is_ok());
        if even(values) {
            let sign = if step < 0 { '-' } else { '+' };
            let s = step.unsigned_abs();
            return if small {
                format!("({v0} {sign} {s} * {index})")
            } else {
                format!("((long long){v0} {sign} (long long){s} * {index})")
            };
        }
        if small {
            "int"
        } else {
            "long long"
        }
    } else if values[0].ends_with('f') {
        "float"
    } else {
        "double"
    };
    let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    let columns = tables.entry(ty).or_default();
    let col = columns
        .iter()
        .position(|c| *c == values)
        .unwrap_or_else(|| {
            columns.push(values);
            columns.len() - 1
        });
    let short = ty.split(' ').next_back().unwrap_or(ty);
    format!("{table}_{short}[{index}][{col}]")
}

/// Whether integers with these values step evenly (`a + b * i`).
fn even(values: &[&str]) -> bool {
    let ints: Option<Vec<i64>> = values.iter().map(|v| v.parse().ok()).collect();
    let Some(ints) = ints else { return false };
    let (v0, step) = (ints[0], ints[1] - ints[0]);
    ints.iter()
        .enumerate()
        .all(|(k, &v)| Some(v) == (k as i64).checked_mul(step).and_then(|x| x.checked_add(v0)))
}

/// Renders `regions` (consecutive regions of one kernel, in order) with every run of at least
/// two isomorphic units rolled into a loop. Returns the kernel body and the declarations of
/// the `__constant__` tables it reads (to go before the kernel, at file scope); `tag` (a C
/// identifier unique to the kernel) prefixes their names; `index` names the loop variable
/// (distinct for nested rolls). Without a tag, only runs whose
/// differing literals are evenly stepping integers are rolled (no tables).
pub(super) fn roll(tag: Option<&str>, index: &str, regions: &[String]) -> (String, String) {
    let canons: Vec<Canon<'_>> = regions.iter().map(|r| canon(r)).collect();
    let unit = |start: usize, period: usize| -> String { regions[start..start + period].concat() };
    let mut body = String::new();
    let mut decls = String::new();
    let mut runs = 0;
    let mut i = 0;
    while i < regions.len() {
        // The unit and repetition count covering the most regions from i.
        let mut best = (1, 1);
        for period in 1..=MAX_PERIOD.min((regions.len() - i) / 2) {
            let mut reps = 1;
            while i + (reps + 1) * period <= regions.len()
                && (0..period).all(|j| same(&canons[i + j], &canons[i + reps * period + j]))
            {
                reps += 1;
            }
            if reps > 1 && period * reps > best.0 * best.1 {
                best = (period, reps);
            }
        }
        let (period, mut reps) = best;
        if reps > 1 && tag.is_none() {
            // Only runs that need no table.
            let units: Vec<String> = (0..reps).map(|r| unit(i + r * period, period)).collect();
            let cs: Vec<Canon<'_>> = units.iter().map(|u| canon(u)).collect();
            let stepping = (0..cs[0].lits.len()).all(|n| {
                let values: Vec<&str> = cs.iter().map(|c| c.lits[n].text).collect();
                values.iter().all(|&v| v == values[0])
                    || cs[0].lits[n].kind == Kind::Int && even(&values)
            });
            if !stepping {
                reps = 1;
            }
        }
        if reps == 1 {
            body.push_str(&regions[i]);
            i += 1;
            continue;
        }
        let units: Vec<String> = (0..reps).map(|r| unit(i + r * period, period)).collect();
        let cs: Vec<Canon<'_>> = units.iter().map(|u| canon(u)).collect();
        let first = &units[0];
        // Each literal that differs: an even step or a table column.
        let table = format!("{}_roll{runs}", tag.unwrap_or("mulo"));
        let mut tables: BTreeMap<&'static str, Vec<Vec<String>>> = BTreeMap::new();
        let mut replace: Vec<(Tok, String)> = Vec::new();
        for (n, lit) in cs[0].lits.iter().enumerate() {
            let values: Vec<&str> = cs.iter().map(|c| c.lits[n].text).collect();
            if values.iter().all(|&v| v == lit.text) {
                continue;
            }
            replace.push((
                lit.tok,
                column(index, lit.kind, &values, &table, &mut tables),
            ));
        }
        for (ty, columns) in &tables {
            let short = ty.split(' ').next_back().unwrap_or(ty);
            let _ = writeln!(
                decls,
                "__constant__ {ty} {table}_{short}[{reps}][{}] = {{",
                columns.len()
            );
            for r in 0..reps {
                let row: Vec<&str> = columns.iter().map(|c| c[r].as_str()).collect();
                let _ = writeln!(decls, "    {{{}}},", row.join(", "));
            }
            let _ = writeln!(decls, "}};");
        }
        runs += 1;
        // What the units are, from their comments.
        let _ = writeln!(
            body,
            "    // {reps} runs of the same {period} region(s), differing only in constants:"
        );
        for u in &units {
            let notes: Vec<&str> = tokens(u)
                .iter()
                .filter(|t| t.kind == Kind::Comment)
                .map(|t| u[t.start + 2..t.end].trim())
                .collect();
            let _ = writeln!(body, "    //   {}", notes.join(" | "));
        }
        let _ = writeln!(
            body,
            "    #pragma unroll 1\n    for (int {index} = 0; {index} < {reps}; ++{index}) {{"
        );
        // The first unit's text, comments dropped, differing literals replaced.
        let mut text = String::new();
        let mut rep = replace.iter().peekable();
        for t in tokens(first) {
            if t.kind == Kind::Comment {
                continue;
            }
            match rep.peek() {
                Some((r, e)) if r.start == t.start => {
                    text.push_str(e);
                    rep.next();
                }
                _ => text.push_str(&first[t.start..t.end]),
            }
        }
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let _ = writeln!(body, "    {line}");
        }
        let _ = writeln!(body, "    }}");
        i += period * reps;
    }
    (body, decls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_equal_regions_become_one_loop() {
        let region = |a: usize, b: usize| {
            format!("    // v{a}: note {a}\n    if (tid < 1) {{ const float v{a} = scratch[{b} + p]; scratch[{} + p] = (v{a} + 1.0e-5f); }}\n    __syncthreads();\n", b + 7)
        };
        let regions = vec![region(3, 100), region(9, 103), region(12, 106)];
        let (body, decls) = roll(Some("k"), "mulo_i", &regions);
        assert!(decls.is_empty(), "{decls}");
        assert!(
            body.contains("for (int mulo_i = 0; mulo_i < 3; ++mulo_i)"),
            "{body}"
        );
        assert!(body.contains("scratch[(100 + 3 * mulo_i) + p]"), "{body}");
        assert!(body.contains("scratch[(107 + 3 * mulo_i) + p]"), "{body}");
        assert!(body.contains("note 12"), "{body}");
        assert_eq!(body.matches("__syncthreads").count(), 1, "{body}");
    }

    #[test]
    fn uneven_offsets_go_to_a_table_and_alternating_units_roll() {
        let mean = |o: usize| format!("    {{ double s = 0.0; s += partials[{o}]; }}\n");
        let point = |a: usize, o: usize| format!("    {{ const float v{a} = scratch[{o}]; }}\n");
        let regions = vec![
            mean(5),
            point(1, 40),
            mean(9),
            point(2, 41),
            mean(20),
            point(3, 42),
        ];
        let (body, decls) = roll(Some("k"), "mulo_i", &regions);
        assert!(
            decls.contains("__constant__ int k_roll0_int[3][1] = {"),
            "{decls}"
        );
        assert!(decls.contains("{5},\n    {9},\n    {20},"), "{decls}");
        assert!(body.contains("partials[k_roll0_int[mulo_i][0]]"), "{body}");
        assert!(body.contains("scratch[(40 + 1 * mulo_i)]"), "{body}");
        assert_eq!(body.matches("for (int mulo_i").count(), 1, "{body}");
    }

    #[test]
    fn different_code_or_register_arrays_do_not_roll() {
        let a = "    { float v1[2]; v1[0] = 1.0f; }\n".to_string();
        let b = "    { float v2[3]; v2[0] = 1.0f; }\n".to_string();
        let c = "    { float v2[2]; v2[0] = 2.0f; }\n".to_string();
        let (body, _) = roll(Some("k"), "mulo_i", &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(body, format!("{a}{b}{c}"));
        // The same registers used differently do not match either.
        let d = "    { const float v1 = 1.0f; const float v2 = v1 + v1; }\n".to_string();
        let e = "    { const float v3 = 1.0f; const float v4 = v3 + v5; }\n".to_string();
        let (body, _) = roll(Some("k"), "mulo_i", &[d.clone(), e.clone()]);
        assert_eq!(body, format!("{d}{e}"));
    }

    #[test]
    fn exponents_and_hex_are_not_integers() {
        let kinds: Vec<Kind> = tokens("9.99999975e-6f 0x7f 12 v3 1.5e3")
            .into_iter()
            .filter(|t| t.kind != Kind::Space)
            .map(|t| t.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![Kind::Float, Kind::Other, Kind::Int, Kind::Reg, Kind::Float]
        );
    }

    #[test]
    fn differing_floats_go_to_typed_tables() {
        let r = |a: usize, c: &str, d: &str| {
            format!("    {{ const float v{a} = ({c} * scratch[{a}]); double s = {d}; }}\n")
        };
        let regions = vec![r(1, "3.5e-1f", "2.0e3"), r(2, "9.9e-1f", "4.0e3")];
        let (body, decls) = roll(Some("k"), "mulo_i", &regions);
        assert!(
            decls.contains(
                "__constant__ float k_roll0_float[2][1] = {\n    {3.5e-1f},\n    {9.9e-1f},"
            ),
            "{decls}"
        );
        assert!(
            decls.contains("__constant__ double k_roll0_double[2][1]"),
            "{decls}"
        );
        assert!(
            body.contains("(k_roll0_float[mulo_i][0] * scratch[(1 + 1 * mulo_i)])"),
            "{body}"
        );
        // An f32 literal never stands for an f64 one.
        let (body, _) = roll(
            Some("k"),
            "mulo_i",
            &[r(1, "3.5e-1f", "2.0e3"), r(2, "9.9e-1", "4.0e3")],
        );
        assert!(!body.contains("mulo_i"), "{body}");
    }

    #[test]
    fn offsets_beyond_int_use_long_long() {
        let r = |o: u64| format!("    {{ scratch[{o} + p] = 0.0f; }}\n");
        let big = 3_000_000_000u64;
        let (body, _) = roll(Some("k"), "mulo_i", &[r(big), r(big + 7), r(big + 14)]);
        assert!(
            body.contains("((long long)3000000000 + (long long)7 * mulo_i)"),
            "{body}"
        );
    }
}
