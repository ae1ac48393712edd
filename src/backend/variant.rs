//! Naming a backend and its kernel variant at run time.

use std::fmt;
use std::str::FromStr;

use chord_kernels::simd::Level;

use super::Op;
use super::mixed::{not_mixed, slot};

/// A built-in backend with its kernel variant: what `--backend` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// [`super::ScalarBackend`].
    Scalar,
    /// [`super::BlockedBackend`].
    Blocked,
    /// [`super::SimdBackend`] forced to a level.
    Simd(Level),
}

impl Variant {
    /// Every variant this CPU runs: scalar, blocked, then each SIMD level, widest first.
    pub fn available() -> Vec<Variant> {
        let simd = Level::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .map(Variant::Simd);
        [Variant::Scalar, Variant::Blocked]
            .into_iter()
            .chain(simd)
            .collect()
    }

    /// Whether this CPU runs the variant.
    pub fn is_supported(self) -> bool {
        match self {
            Variant::Simd(l) => l.is_supported(),
            _ => true,
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Variant::Scalar => f.write_str("scalar"),
            Variant::Blocked => f.write_str("blocked"),
            Variant::Simd(l) => write!(f, "simd-{}", l.name()),
        }
    }
}

impl FromStr for Variant {
    type Err = String;

    /// `scalar`, `blocked`, `simd` (the widest level this CPU runs) or `simd-LEVEL`
    /// (`simd-amx`, `simd-avx512`, `simd-avx2`, `simd-portable`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scalar" => return Ok(Variant::Scalar),
            "blocked" => return Ok(Variant::Blocked),
            "simd" => return Ok(Variant::Simd(chord_kernels::simd::Isa::best().level())),
            _ => {}
        }
        Level::ALL
            .into_iter()
            .find(|l| s.strip_prefix("simd-") == Some(l.name()))
            .map(Variant::Simd)
            .ok_or_else(|| {
                format!("unknown backend '{s}': expected scalar, blocked, simd, simd-amx, simd-avx512, simd-avx2 or simd-portable")
            })
    }
}

/// What `--backend` names: one built-in backend, or a mix of them op by op
/// ([`super::Mixed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    One(Variant),
    /// `matmul=V,op=V,...,*=V`: matmul (with embedding) on `matmul`, each of `ops` on its
    /// variant, the rest on `rest`.
    Mixed {
        matmul: Variant,
        ops: Vec<(Op, Variant)>,
        rest: Variant,
    },
}

impl BackendSpec {
    /// The variant that prepares the weights and runs the matmuls.
    pub fn matmul(&self) -> Variant {
        match self {
            BackendSpec::One(v) => *v,
            BackendSpec::Mixed { matmul, .. } => *matmul,
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::One(v) => write!(f, "{v}"),
            BackendSpec::Mixed { matmul, ops, rest } => {
                write!(f, "matmul={matmul}")?;
                for (op, v) in ops {
                    write!(f, ",{op}={v}")?;
                }
                write!(f, ",*={rest}")
            }
        }
    }
}

impl FromStr for BackendSpec {
    type Err = String;

    /// A [`Variant`] name, or `OP=VARIANT` pairs separated by commas: OP is `matmul`,
    /// `rmsnorm`, `rope`, `softmax`, `swiglu`, `geglu`, `add`, `attention` or `*` (every op not
    /// named). Without `*` the unnamed ops run on the matmul backend; without `matmul`,
    /// matmul runs on `*`'s.
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.contains('=') {
            return s.parse().map(BackendSpec::One);
        }
        let (mut matmul, mut rest, mut ops) = (None, None, Vec::<(Op, Variant)>::new());
        for part in s.split(',') {
            let (op, v) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' in a mixed backend: expected OP=BACKEND"))?;
            let v: Variant = v.trim().parse()?;
            let dup = || format!("'{}' is named twice in a mixed backend", op.trim());
            match op.trim() {
                "*" => {
                    if rest.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                "matmul" => {
                    if matmul.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                name => {
                    let op: Op = name.parse()?;
                    if slot(op).is_none() {
                        return Err(not_mixed(op));
                    }
                    if ops.iter().any(|(o, _)| *o == op) {
                        return Err(dup());
                    }
                    ops.push((op, v));
                }
            }
        }
        let (matmul, rest) = match (matmul, rest) {
            (Some(m), Some(r)) => (m, r),
            (Some(m), None) => (m, m),
            (None, Some(r)) => (r, r),
            (None, None) => {
                return Err("a mixed backend names matmul=BACKEND or *=BACKEND".into());
            }
        };
        Ok(BackendSpec::Mixed { matmul, ops, rest })
    }
}

/// Evaluates `$body` with `$b` bound to the built-in backend that the [`Variant`] `$variant`
/// names, built with `$threads` threads (the simd backend in [`Mode`](super::Mode) `$mode`;
/// the others have one mode). The body is instantiated once per backend type, so generic
/// code runs on each without a trait object. A backend that cannot be built (a SIMD level this
/// CPU lacks, no threads) returns its [`Error`](super::Error) through `?`, so the enclosing
/// function's error type must take it.
///
/// This is the one place where a variant becomes a backend: the command line, `chord bench
/// kernels`, the criterion benches and [`Mixed::from_variants`](super::Mixed::from_variants)
/// all go through it.
///
/// ```
/// # fn main() -> Result<(), chord::Error> {
/// use chord::{Backend, Variant, backend::Mode};
/// for v in Variant::available() {
///     let name = chord::with_variant!(v, 1, Mode::Exact, b => b.name());
///     assert!(name.starts_with(&v.to_string()[..4]));
/// }
/// # Ok(())
/// # }
/// ```
#[macro_export]
macro_rules! with_variant {
    ($variant:expr, $threads:expr, $mode:expr, $b:ident => $body:expr) => {{
        let threads: usize = $threads;
        let mode: $crate::backend::Mode = $mode;
        match $variant {
            $crate::Variant::Scalar => {
                let _ = (threads, mode);
                let $b = $crate::ScalarBackend::new();
                $body
            }
            $crate::Variant::Blocked => {
                let _ = mode;
                let $b = $crate::BlockedBackend::new(threads)?;
                $body
            }
            $crate::Variant::Simd(level) => {
                let $b = $crate::SimdBackend::with_level(level, threads)?.with_mode(mode);
                $body
            }
        }
    }};
}

/// [`with_variant!`] for a [`BackendSpec`]: one variant, or a [`Mixed`](super::Mixed) backend
/// whose matmul backend is instantiated per variant, as `with_variant!` does.
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, $threads:expr, $mode:expr, $b:ident => $body:expr) => {{
        let spec: &$crate::backend::BackendSpec = $spec;
        let (threads, mode): (usize, $crate::backend::Mode) = ($threads, $mode);
        match spec {
            $crate::backend::BackendSpec::One(v) => {
                $crate::with_variant!(*v, threads, mode, $b => $body)
            }
            $crate::backend::BackendSpec::Mixed { matmul, ops, rest } => {
                $crate::with_variant!(*matmul, threads, mode, m => {
                    let $b = $crate::backend::Mixed::from_variants(m, *matmul, ops, *rest, threads)?;
                    $body
                })
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_specs_parse_and_print_back() {
        let s: BackendSpec = "matmul=simd-portable,softmax=scalar,*=blocked"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            BackendSpec::Mixed {
                matmul: Variant::Simd(Level::Portable),
                ops: vec![(Op::Softmax, Variant::Scalar)],
                rest: Variant::Blocked
            }
        );
        assert_eq!(
            s.to_string(),
            "matmul=simd-portable,softmax=scalar,*=blocked"
        );
        assert_eq!(s.matmul(), Variant::Simd(Level::Portable));
        assert_eq!("scalar".parse(), Ok(BackendSpec::One(Variant::Scalar)));
        let only_rest: BackendSpec = "*=blocked,rope=scalar".parse().unwrap();
        assert_eq!(only_rest.matmul(), Variant::Blocked);
        for (bad, says) in [
            ("softmax=scalar", "names matmul=BACKEND or *=BACKEND"),
            ("matmul=simd,matmul=scalar", "named twice"),
            ("matmul=simd,embedding=scalar", "embedding goes with matmul"),
            ("matmul=simd,softmax", "expected OP=BACKEND"),
            ("matmul=gpu", "unknown backend 'gpu'"),
            ("matmul=simd,norm=scalar", "unknown op 'norm'"),
        ] {
            let e = bad.parse::<BackendSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
