//! Naming a backend and its kernel variant at run time.

use std::fmt;
use std::str::FromStr;

use chord_kernels::simd::Level;

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
    /// (`simd-avx512`, `simd-avx2`, `simd-portable`).
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
                format!("unknown backend '{s}': expected scalar, blocked, simd, simd-avx512, simd-avx2 or simd-portable")
            })
    }
}
