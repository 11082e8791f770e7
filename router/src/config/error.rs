//! Config errors: every one carries the line and column it is about, and is printed as
//! `FILE:LINE:COL: what is wrong, what was expected` (the format editors and CI annotate).

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: u32,
    pub column: u32,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub at: Location,
    pub message: String,
}

impl ConfigError {
    pub fn new(at: Location, message: impl Into<String>) -> Self {
        Self {
            at,
            message: message.into(),
        }
    }
}

/// Every problem found in one file, sorted by position. Loading fails if there is at least
/// one; warnings alone do not fail.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    pub fn new(file: &Path, mut errors: Vec<ConfigError>) -> Self {
        errors.sort_by_key(|e| e.at);
        errors.dedup();
        Self {
            file: file.to_path_buf(),
            errors,
        }
    }

    /// One error not tied to a place in the file (the file cannot be read at all).
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        Self::new(
            file,
            vec![ConfigError::new(Location { line: 0, column: 0 }, message)],
        )
    }

    /// The lines an operator sees, one per error.
    pub fn lines(&self) -> Vec<String> {
        self.errors.iter().map(|e| render(&self.file, e)).collect()
    }
}

pub fn render(file: &Path, e: &ConfigError) -> String {
    if e.at.line == 0 {
        format!("{}: {}", file.display(), e.message)
    } else {
        format!(
            "{}:{}:{}: {}",
            file.display(),
            e.at.line,
            e.at.column,
            e.message
        )
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines = self.lines();
        write!(f, "{}", lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}
