//! docs/FORMAT.md against the code: every byte-map row of every on-media structure must have
//! the offset and size of the real field, and each table must cover its structure exactly,
//! with no gap and no overlap. The feature-flag and version tables must list what the code
//! defines. Change a structure without changing the doc (or the reverse) and this fails.

use pmfs::format::devices::{DeviceTable, MemberHeader};
use pmfs::format::space::SummaryHeader;
use pmfs::format::{
    CompatFeatures, ExtentRecord, FORMAT_VERSIONS, FsState, IncompatFeatures, Inode, NodeHeader,
    RoCompatFeatures, SlotHeader, Superblock, UndoHeader, XattrHeader,
};
use std::mem::{offset_of, size_of};

const DOC: &str = include_str!("../docs/FORMAT.md");

#[derive(Debug)]
struct Field {
    name: &'static str,
    offset: usize,
    size: usize,
}

#[derive(Debug)]
struct Layout {
    name: &'static str,
    size: usize,
    fields: Vec<Field>,
}

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// `layout!(Type { field, ... })`: the offset and size of each listed field. The list must name
/// every field: a destructuring pattern without `..` makes a missing or stale name a compile
/// error.
macro_rules! layout {
    ($t:ident { $($f:ident),* $(,)? }) => {{
        #[allow(dead_code)]
        fn exhaustive(v: &$t) {
            let $t { $($f: _),* } = v;
        }
        Layout {
            name: stringify!($t),
            size: size_of::<$t>(),
            fields: vec![$(Field {
                name: stringify!($f),
                offset: offset_of!($t, $f),
                size: field_size(|v: &$t| &v.$f),
            }),*],
        }
    }};
}

fn layouts() -> Vec<Layout> {
    vec![
        layout!(Superblock {
            magic,
            version,
            sb_size,
            compat,
            ro_compat,
            incompat,
            uuid,
            label,
            block_size,
            chunk_blocks,
            block_count,
            journal_start,
            journal_slots,
            journal_slot_blocks,
            bitmap_start,
            bitmap_blocks,
            itable_dir_block,
            meta_end,
            created_ns,
            huge_regions,
            reserved,
            itable_fanout,
            crc,
        }),
        layout!(FsState {
            magic,
            clean,
            pad,
            mount_count,
            orphan_head,
            free_blocks,
            last_mount_ns,
            last_unmount_ns,
            reserved,
            crc,
        }),
        layout!(SlotHeader {
            magic,
            generation,
            slot_index,
            pad,
            reserved,
        }),
        layout!(UndoHeader {
            generation,
            target,
            first,
            len,
            kind,
            pad,
            crc,
            pad2,
        }),
        layout!(Inode {
            mode,
            flags,
            nlink,
            uid,
            gid,
            size,
            blocks,
            atime_ns,
            mtime_ns,
            ctime_ns,
            btime_ns,
            generation,
            rdev,
            parent,
            xattr_block,
            xattr_blocks,
            inline_count,
            tree_root,
            orphan_next,
            orphan_prev,
            inline,
            reserved,
            crc,
        }),
        layout!(ExtentRecord {
            file_block,
            dev_block,
            len,
            flags,
        }),
        layout!(NodeHeader {
            magic,
            level,
            count,
            used,
            kind,
            pad,
            owner,
            reserved,
        }),
        layout!(DeviceTable {
            magic,
            count,
            pad,
            entries,
            reserved,
            crc,
        }),
        layout!(MemberHeader {
            magic,
            uuid,
            index,
            count,
            base,
            size,
            node,
            pad,
            reserved,
            crc,
        }),
        layout!(SummaryHeader {
            magic,
            counts_valid,
            regions,
            reserved,
        }),
        layout!(XattrHeader {
            magic,
            count,
            used,
            crc,
            owner,
            reserved,
        }),
    ]
}

/// One row of a byte-map table: offset, size, field name, line number.
#[derive(Debug)]
struct Row {
    offset: usize,
    size: usize,
    field: String,
    line: usize,
}

fn cells(line: &str) -> Vec<String> {
    let t = line.trim();
    let t = t.strip_prefix('|').unwrap_or(t);
    let t = t.strip_suffix('|').unwrap_or(t);
    t.split('|').map(|c| c.trim().to_string()).collect()
}

fn number(s: &str) -> Option<usize> {
    let s = s.replace([',', '_'], "");
    match s.strip_prefix("0x") {
        Some(h) => usize::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The byte-map table (`| offset | size | field | meaning |`) that follows each `### Name`
/// heading, by name. Errors go to `errors`.
fn byte_maps(doc: &str, errors: &mut Vec<String>) -> Vec<(String, Vec<Row>)> {
    let mut out: Vec<(String, Vec<Row>)> = Vec::new();
    // (section name, inside its table, table done)
    let mut current: Option<(String, bool, bool)> = None;
    for (i, line) in doc.lines().enumerate() {
        let lineno = i + 1;
        if let Some(h) = line.strip_prefix("### ") {
            current = Some((h.trim().to_string(), false, false));
            continue;
        }
        if line.starts_with("## ") || line.starts_with("# ") {
            current = None;
            continue;
        }
        let Some((name, in_table, done)) = current.as_mut() else {
            continue;
        };
        if *done {
            continue;
        }
        if !line.trim_start().starts_with('|') {
            if *in_table {
                *done = true;
            }
            continue;
        }
        let c = cells(line);
        if !*in_table {
            // The first table of the section must be the byte map (or the section has none).
            if c.first().map(String::as_str) == Some("offset") {
                if c != ["offset", "size", "field", "meaning"] {
                    // Tables of other shapes (leaf records, entries) are not byte maps.
                    *done = true;
                    continue;
                }
                *in_table = true;
                out.push((name.clone(), Vec::new()));
            } else {
                *done = true;
            }
            continue;
        }
        if c.iter()
            .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':')))
        {
            continue; // separator row
        }
        let (Some(offset), Some(size)) = (
            c.first().and_then(|s| number(s)),
            c.get(1).and_then(|s| number(s)),
        ) else {
            errors.push(format!(
                "FORMAT.md:{lineno}: {name}: cannot parse row {line:?}"
            ));
            continue;
        };
        let field = c
            .get(2)
            .map(|f| f.trim_matches('`').to_string())
            .unwrap_or_default();
        if let Some((_, rows)) = out.last_mut() {
            rows.push(Row {
                offset,
                size,
                field,
                line: lineno,
            });
        }
    }
    out
}

/// Every disagreement between `doc` and the code.
fn check(doc: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let maps = byte_maps(doc, &mut errors);
    for layout in layouts() {
        let name = layout.name;
        // The macro's list itself must cover the structure (no field forgotten).
        let mut end = 0;
        for f in &layout.fields {
            if f.offset != end {
                errors.push(format!(
                    "{name}: code field {} at {} (expected {end}): implicit padding?",
                    f.name, f.offset
                ));
            }
            end = f.offset + f.size;
        }
        if end != layout.size {
            errors.push(format!(
                "{name}: code fields end at {end}, size_of is {}",
                layout.size
            ));
        }

        let found: Vec<&Vec<Row>> = maps
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, r)| r)
            .collect();
        let rows = match found.as_slice() {
            [rows] => *rows,
            [] => {
                errors.push(format!(
                    "FORMAT.md: no `### {name}` section with a byte map"
                ));
                continue;
            }
            _ => {
                errors.push(format!("FORMAT.md: `### {name}` appears more than once"));
                continue;
            }
        };
        let mut at = 0;
        for row in rows {
            let l = row.line;
            if row.offset != at {
                errors.push(format!(
                    "FORMAT.md:{l}: {name}.{}: offset {} but the previous row ends at {at} (gap or overlap)",
                    row.field, row.offset
                ));
            }
            at = row.offset + row.size;
            match layout.fields.iter().find(|f| f.name == row.field) {
                None => errors.push(format!("FORMAT.md:{l}: {name} has no field `{}`", row.field)),
                Some(f) if (f.offset, f.size) != (row.offset, row.size) => errors.push(format!(
                    "FORMAT.md:{l}: {name}.{}: doc says offset {} size {}, code has offset {} size {}",
                    f.name, row.offset, row.size, f.offset, f.size
                )),
                Some(_) => {}
            }
        }
        if at != layout.size {
            errors.push(format!(
                "FORMAT.md: {name}: the table ends at {at}, the structure is {} bytes",
                layout.size
            ));
        }
        for f in &layout.fields {
            let n = rows.iter().filter(|r| r.field == f.name).count();
            if n != 1 {
                errors.push(format!("FORMAT.md: {name}.{} is listed {n} times", f.name));
            }
        }
    }

    // Feature flags: one row per flag, with its bit.
    let mut flags: Vec<(&str, &str, u64)> = Vec::new();
    flags.extend(
        IncompatFeatures::all()
            .iter_names()
            .map(|(n, f)| ("incompat", n, f.bits())),
    );
    flags.extend(
        RoCompatFeatures::all()
            .iter_names()
            .map(|(n, f)| ("ro_compat", n, f.bits())),
    );
    flags.extend(
        CompatFeatures::all()
            .iter_names()
            .map(|(n, f)| ("compat", n, f.bits())),
    );
    for (field, name, bits) in flags {
        let row = format!("| `{field}` | {} | `{name}` |", bits.trailing_zeros());
        if !doc.contains(&row) {
            errors.push(format!(
                "FORMAT.md: feature table lacks the row starting {row:?}"
            ));
        }
    }
    // Versions: one row per entry of FORMAT_VERSIONS.
    for (v, change, date) in FORMAT_VERSIONS {
        let row = format!("| {v} | {change} | {date} |");
        if !doc.contains(&row) {
            errors.push(format!("FORMAT.md: version table lacks {row:?}"));
        }
    }
    errors
}

#[test]
fn format_doc_matches_the_code() {
    let errors = check(DOC);
    assert!(
        errors.is_empty(),
        "docs/FORMAT.md and src/format disagree:\n{}",
        errors.join("\n")
    );
}

#[test]
fn every_struct_has_a_byte_map() {
    let mut errors = Vec::new();
    let maps = byte_maps(DOC, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<&str> = maps.iter().map(|(n, _)| n.as_str()).collect();
    for l in layouts() {
        assert!(names.contains(&l.name), "{} missing from {names:?}", l.name);
    }
}

/// The checker itself catches drift: each mutation of the doc must produce an error.
#[test]
fn drift_is_detected() {
    let mutations = [
        // Wrong size.
        ("| 8 | 4 | `version` |", "| 8 | 8 | `version` |"),
        // Wrong offset (and so a gap).
        (
            "| 16 | 8 | `owner` | u64 the owning inode |",
            "| 20 | 8 | `owner` | u64 the owning inode |",
        ),
        // Renamed field.
        ("| 4 | 4 | `nlink` |", "| 4 | 4 | `links` |"),
        // A row missing.
        ("| 36 | 4 | `pad2` | zero |\n", ""),
        // A feature flag missing.
        (
            "| `compat` | 0 | `DEFERRED_FREE` |",
            "| `compat` | 1 | `DEFERRED_FREE` |",
        ),
        // A struct section renamed.
        ("### ExtentRecord", "### Extent"),
    ];
    for (from, to) in mutations {
        assert!(
            DOC.contains(from),
            "mutation source {from:?} not in the doc"
        );
        let doc = DOC.replacen(from, to, 1);
        assert!(
            !check(&doc).is_empty(),
            "mutation {from:?} -> {to:?} went unnoticed"
        );
    }
}
