//! Compute API microversions: which one a request asks for, and the range Zova serves.
//!
//! The maximum is the highest microversion whose changes Zova implements for every route it
//! serves (a route it does not serve is a 404 at every version). Raising it means implementing
//! each later change to those routes first, see `docs` in the README.

use std::fmt;

/// A compute API microversion, `2.N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

pub const MIN: Version = Version::new(2, 1);
/// 2.47: the server embeds its flavor. 2.48 and later change routes not served here or add
/// behaviour not implemented (2.52 tags at create, 2.53 service and hypervisor UUIDs).
pub const MAX: Version = Version::new(2, 47);

impl Version {
    pub const fn new(major: u16, minor: u16) -> Self {
        Version { major, minor }
    }

    /// True from microversion `2.minor` on.
    pub fn at_least(self, minor: u16) -> bool {
        self >= Version::new(2, minor)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why a microversion cannot be served: a malformed request is a 400, a well-formed one out of
/// range a 406.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("API Version String {0} is of invalid format. Must be of format MajorNum.MinorNum.")]
    Malformed(String),
    #[error("Version {0} is not supported by the API. Minimum is {MIN} and maximum is {MAX}.")]
    Unsupported(String),
}

fn parse(text: &str) -> Result<Version, VersionError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("latest") {
        return Ok(MAX);
    }
    let malformed = || VersionError::Malformed(text.to_string());
    let (major, minor) = text.split_once('.').ok_or_else(malformed)?;
    let number = |s: &str| -> Result<u16, VersionError> {
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(malformed());
        }
        s.parse().map_err(|_| malformed())
    };
    let version = Version::new(number(major)?, number(minor)?);
    if version < MIN || version > MAX {
        return Err(VersionError::Unsupported(version.to_string()));
    }
    Ok(version)
}

/// The microversion a request asks for: `OpenStack-API-Version: compute X` wins over the older
/// `X-OpenStack-Nova-API-Version: X`; neither means the minimum, as in Nova.
pub fn requested(openstack: Option<&str>, nova: Option<&str>) -> Result<Version, VersionError> {
    if let Some(header) = openstack {
        // The header may name several services: "compute 2.47, volume 3.60".
        for part in header.split(',') {
            let mut words = part.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(service), Some(version), None) if service.eq_ignore_ascii_case("compute") => {
                    return parse(version)
                }
                (Some(service), None, None) if service.eq_ignore_ascii_case("compute") => {
                    return Err(VersionError::Malformed(part.trim().to_string()))
                }
                _ => {}
            }
        }
    }
    match nova {
        Some(version) => parse(version),
        None => Ok(MIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newer_header_wins_and_none_means_the_minimum() {
        assert_eq!(requested(None, None), Ok(MIN));
        assert_eq!(
            requested(Some("compute 2.10"), Some("2.3")),
            Ok(Version::new(2, 10))
        );
        assert_eq!(requested(None, Some("2.3")), Ok(Version::new(2, 3)));
        assert_eq!(
            requested(Some("volume 3.60"), Some("2.5")),
            Ok(Version::new(2, 5))
        );
        assert_eq!(
            requested(Some("volume 3.60, compute 2.7"), None),
            Ok(Version::new(2, 7))
        );
        assert_eq!(requested(Some("compute latest"), None), Ok(MAX));
        assert_eq!(requested(None, Some("LATEST")), Ok(MAX));
    }

    #[test]
    fn out_of_range_is_unsupported_and_garbage_is_malformed() {
        assert!(matches!(
            requested(Some("compute 2.100"), None),
            Err(VersionError::Unsupported(_))
        ));
        assert!(matches!(
            requested(None, Some("2.0")),
            Err(VersionError::Unsupported(_))
        ));
        assert!(matches!(
            requested(None, Some("3.1")),
            Err(VersionError::Unsupported(_))
        ));
        for bad in [
            "2",
            "2.",
            ".1",
            "2.x",
            "2.1.1",
            "02.1",
            "2.01",
            "",
            "99999999.1",
        ] {
            assert!(
                matches!(requested(None, Some(bad)), Err(VersionError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            requested(Some("compute"), None),
            Err(VersionError::Malformed(_))
        ));
        let message = requested(None, Some("2.99")).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "Version 2.99 is not supported by the API. Minimum is 2.1 and maximum is {MAX}."
            )
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(Version::new(2, 10) > Version::new(2, 9));
        assert!(Version::new(2, 47).at_least(47));
        assert!(!Version::new(2, 46).at_least(47));
    }
}
