//! Configuration errors in libvirt's style: `FILE:LINE:COL: XML error: message`.

use std::fmt;

/// What class of problem an error is; decides the message prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The document is malformed or misses something required (`XML error:`).
    Xml,
    /// Valid XML that asks for something impossible (`unsupported configuration:`).
    Unsupported,
    /// A request that does not fit the document, e.g. an unknown `--target` (`invalid argument:`).
    InvalidArg,
    /// The file could not be read (`cannot read file:`).
    Io,
    /// Not an error itself: says how many errors past the cap were left out
    /// (`too many errors:`), placed at the first one left out.
    Omitted,
    /// Not an error: something accepted but ignored, e.g. a guest-only
    /// `<address>` on a disk (`note:`).
    Note,
}

impl ErrorKind {
    /// The libvirt-style prefix printed before the message.
    pub fn prefix(self) -> &'static str {
        match self {
            ErrorKind::Xml => "XML error",
            ErrorKind::Unsupported => "unsupported configuration",
            ErrorKind::InvalidArg => "invalid argument",
            ErrorKind::Io => "cannot read file",
            ErrorKind::Omitted => "too many errors",
            ErrorKind::Note => "note",
        }
    }
}

/// One problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file label (the path as given, or a caller's label for in-memory text).
    pub file: String,
    /// 1-based line; 0 when the error has no position (e.g. unreadable file).
    pub line: u32,
    /// 1-based column in characters; 0 when the error has no position.
    pub col: u32,
    /// The class of problem.
    pub kind: ErrorKind,
    /// Lowercase, no trailing period, values quoted with `'...'`.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}: {}", self.file, self.kind.prefix(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file,
                self.line,
                self.col,
                self.kind.prefix(),
                self.message
            )
        }
    }
}

/// Every problem found in one document, in document order (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The individual errors.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    /// One error per line, without a trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}
