//! Per-item routing options: which tiers an item goes to and how long L2 keeps it.
//!
//! These are the `sync-tiers` and `sync-ttl-secs` headers of the wire contract, and the
//! library's `SubmitOptions`. They carry no I/O.

use std::time::Duration;

/// Which tiers an item is written to. The default is all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiers {
    pub l1: bool,
    pub l2: bool,
    pub l3: bool,
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers { l1: true, l2: true, l3: true }
    }
}

impl Tiers {
    /// Parses a comma list out of `l1,l2,l3`; an empty list or an unknown name is an error.
    pub fn parse(list: &str) -> Result<Tiers, String> {
        let mut tiers = Tiers { l1: false, l2: false, l3: false };
        for name in list.split(',').map(str::trim) {
            match name {
                "l1" => tiers.l1 = true,
                "l2" => tiers.l2 = true,
                "l3" => tiers.l3 = true,
                other => return Err(format!("unknown tier {other:?}, expected l1, l2 or l3")),
            }
        }
        Ok(tiers)
    }
}

/// How long L2 keeps an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CacheTtl {
    /// The engine's configured default (`SYNC_REDIS_TTL_SECS`).
    #[default]
    Default,
    /// No expiry.
    Forever,
    /// Expire after this long.
    After(Duration),
}

impl CacheTtl {
    /// Seconds for the L2 script: 0 means no expiry.
    pub fn resolve_secs(self, default_secs: u64) -> u64 {
        match self {
            CacheTtl::Default => default_secs,
            CacheTtl::Forever => 0,
            CacheTtl::After(duration) => duration.as_secs().max(1),
        }
    }

    /// The `sync-ttl-secs` header: `0` = no expiry.
    pub fn from_secs(secs: u64) -> CacheTtl {
        if secs == 0 {
            CacheTtl::Forever
        } else {
            CacheTtl::After(Duration::from_secs(secs))
        }
    }
}

/// Options for one submitted item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SubmitOptions {
    pub tiers: Tiers,
    pub redis_ttl: CacheTtl,
}

/// A compact key for grouping items with the same options.
pub type OptionsKey = SubmitOptions;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_accepts_known_names_and_rejects_others() {
        assert_eq!(Tiers::parse("l1,l3").unwrap(), Tiers { l1: true, l2: false, l3: true });
        assert_eq!(Tiers::parse(" l2 ").unwrap(), Tiers { l1: false, l2: true, l3: false });
        assert!(Tiers::parse("").is_err());
        assert!(Tiers::parse("l4").is_err());
        assert!(Tiers::parse("l1,").is_err());
    }

    #[test]
    fn ttl_zero_means_forever_and_default_uses_config() {
        assert_eq!(CacheTtl::from_secs(0).resolve_secs(99), 0);
        assert_eq!(CacheTtl::from_secs(5).resolve_secs(99), 5);
        assert_eq!(CacheTtl::Default.resolve_secs(99), 99);
    }
}
