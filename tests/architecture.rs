//! docs/architecture.md's table of crate dependencies matches the `Cargo.toml` files, and every
//! edge points down the documented order (no crate depends on one listed after it).

use std::collections::BTreeSet;
use std::path::Path;

/// The workspace crates a `Cargo.toml`'s `[dependencies]` table names.
fn workspace_deps(manifest: &Path) -> anyhow::Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(manifest)?;
    let value: toml::Table = toml::from_str(&text)?;
    let deps = value
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| {
            t.keys()
                .filter(|k| k.starts_with("m3ae-"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Ok(deps)
}

/// The documented table: `| crate | a, b |` rows under "depends on (workspace crates)".
fn documented(root: &Path) -> anyhow::Result<Vec<(String, BTreeSet<String>)>> {
    let doc = std::fs::read_to_string(root.join("docs/architecture.md"))?;
    let rows = doc
        .lines()
        .skip_while(|l| !l.contains("depends on (workspace crates)"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let deps = cells[2]
                .split(',')
                .map(str::trim)
                .filter(|d| d.starts_with("m3ae-"))
                .map(String::from)
                .collect();
            (cells[1].to_string(), deps)
        })
        .collect();
    Ok(rows)
}

#[test]
fn the_documented_dependency_graph_is_the_real_one_and_points_down() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = documented(root)?;
    let mut crates: Vec<String> = std::fs::read_dir(root.join("crates"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    crates.push("m3ae".into());
    crates.sort();
    let mut listed: Vec<String> = doc.iter().map(|(c, _)| c.clone()).collect();
    listed.sort();
    assert_eq!(
        listed, crates,
        "docs/architecture.md must list every crate once"
    );
    for (i, (name, deps)) in doc.iter().enumerate() {
        let manifest = match name.as_str() {
            "m3ae" => root.join("Cargo.toml"),
            c => root.join("crates").join(c).join("Cargo.toml"),
        };
        assert_eq!(
            &workspace_deps(&manifest)?,
            deps,
            "{name}: docs/architecture.md vs {}",
            manifest.display()
        );
        let above: Vec<&String> = doc[i..].iter().map(|(c, _)| c).collect();
        for d in deps {
            assert!(
                !above.contains(&d),
                "{name} depends on {d}, listed after it"
            );
        }
    }
    Ok(())
}
