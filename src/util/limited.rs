//! The one bounded file reader: a file over the limit is refused after reading at
//! most one byte past it, so a huge or endless file costs bounded memory.

use std::io::Read;
use std::path::Path;

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The system refused.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// Over the caller's limit (nothing was read).
    #[error("{path}: file larger than the {max}-byte limit")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit, in bytes.
        max: usize,
    },
    /// A folder, a FIFO, a device: not read at all.
    #[error("{path}: not a regular file")]
    NotAFile {
        /// The path.
        path: String,
    },
}

/// Reads all of `path` if it holds at most `max` bytes.
pub fn read_file(path: &Path, max: usize) -> Result<Vec<u8>, ReadError> {
    let io = |source| ReadError::Io {
        path: path.display().to_string(),
        source,
    };
    // A FIFO would block the open, a device (/dev/zero) never ends: only plain
    // files are read, checked before the open and again on the open file.
    let not_a_file = || ReadError::NotAFile {
        path: path.display().to_string(),
    };
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(not_a_file());
    }
    let file = std::fs::File::open(path).map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        return Err(not_a_file());
    }
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > max {
        return Err(ReadError::TooLarge {
            path: path.display().to_string(),
            max,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_one_byte_over_and_reads_the_limit_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("f");
        std::fs::write(&p, [7u8; 10]).unwrap();
        assert_eq!(read_file(&p, 10).unwrap().len(), 10);
        let e = read_file(&p, 9).unwrap_err().to_string();
        assert!(e.ends_with("file larger than the 9-byte limit"), "{e}");
        assert!(matches!(
            read_file(&dir.join("missing"), 9),
            Err(ReadError::Io { .. })
        ));
        assert!(matches!(
            read_file(Path::new("/dev/zero"), 9),
            Err(ReadError::NotAFile { .. })
        ));
        assert!(matches!(read_file(dir, 9), Err(ReadError::NotAFile { .. })));
    }
}
