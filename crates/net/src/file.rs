//! The small files a peer keeps in its home (`known_servers`, `contacts.toml`): readable by its
//! owner only, and always replaced whole, so a crash or a concurrent reader never sees half.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Opens (creating, mode 0600) `path` for writing, emptied when `truncate`.
pub(crate) fn open_private(path: &Path, truncate: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .open(path)
}

/// Replaces `path` with `bytes`: a temporary file beside it (this process's own, mode 0600) is
/// written and synced, then renamed over it; the directory is synced on a best-effort basis.
pub(crate) fn replace_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mut file = open_private(&tmp, true)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
