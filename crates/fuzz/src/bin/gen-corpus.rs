//! Writes the seed corpora: `corpus/<target>/<name>` for every seed of
//! `natcall_fuzz::seeds::all()`, under `crates/fuzz` or the folder given as the argument.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let seeds = natcall_fuzz::seeds::all();
    for seed in &seeds {
        let dir = root.join("corpus").join(seed.target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(&seed.name), &seed.data)?;
    }
    eprintln!("wrote {} seeds under {}", seeds.len(), root.join("corpus").display());
    Ok(())
}
