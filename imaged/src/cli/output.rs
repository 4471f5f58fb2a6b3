//! Tables and JSON for the client commands.

use proto::cri;

/// Output format of read commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, like crictl.
    Table,
    /// JSON.
    Json,
}

/// Sizes the way crictl prints them: decimal units, three significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{value:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text}{}", UNITS[unit])
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(13)]
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", cells.join("   ").trim_end());
    }
}

fn json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON output")
    );
}

/// `images` output: one row per tag (untagged images get `<none>`).
pub fn print_images(images: &[cri::Image], format: Format, quiet: bool) {
    if quiet {
        for image in images {
            println!("{}", image.id);
        }
        return;
    }
    if format == Format::Json {
        json(&serde_json::json!({ "images": images }));
        return;
    }
    let mut rows = vec![vec![
        "IMAGE".to_string(),
        "TAG".into(),
        "IMAGE ID".into(),
        "SIZE".into(),
    ]];
    for image in images {
        let size = human_size(image.size);
        let id = short_id(&image.id).to_string();
        if image.repo_tags.is_empty() {
            let name = image
                .repo_digests
                .first()
                .and_then(|d| d.split('@').next())
                .unwrap_or("<none>");
            rows.push(vec![name.into(), "<none>".into(), id, size]);
            continue;
        }
        for tag in &image.repo_tags {
            let (name, tag) = tag.rsplit_once(':').unwrap_or((tag, "<none>"));
            rows.push(vec![name.into(), tag.into(), id.clone(), size.clone()]);
        }
    }
    print_table(&rows);
}

/// `inspect` output: the CRI image plus the verbose info.
pub fn print_inspect(image: &cri::Image, info: Option<serde_json::Value>, format: Format) {
    if format == Format::Json {
        json(&serde_json::json!({ "status": image, "info": info }));
        return;
    }
    let user = match (&image.uid, image.username.as_str()) {
        (Some(uid), _) => uid.value.to_string(),
        (None, "") => "(image default)".into(),
        (None, name) => name.into(),
    };
    let rows = [
        ("ID", image.id.clone()),
        ("Tags", image.repo_tags.join(", ")),
        ("Digests", image.repo_digests.join(", ")),
        (
            "Size",
            format!("{} ({} bytes)", human_size(image.size), image.size),
        ),
        ("User", user),
        ("Pinned", image.pinned.to_string()),
        (
            "Top layer",
            info.as_ref()
                .and_then(|i| i["chainID"].as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
    ];
    for (name, value) in rows {
        println!("{name:<10} {value}");
    }
}

/// `fsinfo` output.
pub fn print_fs_info(filesystems: &[cri::FilesystemUsage], format: Format) {
    if format == Format::Json {
        json(&serde_json::json!({ "image_filesystems": filesystems }));
        return;
    }
    let mut rows = vec![vec![
        "MOUNTPOINT".to_string(),
        "USED".into(),
        "BYTES".into(),
        "INODES".into(),
    ]];
    for fs in filesystems {
        let bytes = fs.used_bytes.as_ref().map_or(0, |v| v.value);
        rows.push(vec![
            fs.fs_id
                .as_ref()
                .map_or(String::new(), |f| f.mountpoint.clone()),
            human_size(bytes),
            bytes.to_string(),
            fs.inodes_used.as_ref().map_or(0, |v| v.value).to_string(),
        ]);
    }
    print_table(&rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_crictl() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(4_270_000), "4.27MB");
        assert_eq!(human_size(1_240_000), "1.24MB");
        assert_eq!(human_size(742_000), "742kB");
        assert_eq!(human_size(12_500_000), "12.5MB");
    }
}
