//! Serde helper: `Duration` as a humantime string ("3s 609ms 375us"), so golden files and
//! status output read naturally.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Serializes as humantime.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// Parses humantime.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}
