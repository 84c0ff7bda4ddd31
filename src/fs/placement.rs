//! Where new file data goes on a file system over several devices: on the member of the
//! writing thread's NUMA node (see docs/ARCHITECTURE.md, "Several devices").
//!
//! The thread's node comes from the CPU it runs on (`sched_getcpu`, the CPU half of
//! getcpu(2)) and the CPU lists of `/sys/devices/system/node/nodeN/cpulist`, read once at
//! mount; a test hook ([`set_thread_node`]) pins a thread to a "node" instead, so that the
//! tests on a one-node machine can write from several. The preference is only one: the
//! allocator takes blocks anywhere when the member has no room (and for requests below
//! 2 MiB, which the thread's arena serves wherever its chunks lie). Metadata (inodes, tree
//! nodes, the journal) is not steered: the fixed metadata is on member 0 by the format.

use std::cell::Cell;

thread_local! {
    static THREAD_NODE: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Test hook: makes this thread's writes behave as if it ran on `node` (`None`: the node of
/// the CPU it runs on, the default).
pub fn set_thread_node(node: Option<u32>) {
    THREAD_NODE.with(|n| n.set(node));
}

/// Block ranges of the members and their nodes, fixed at mount.
#[derive(Debug, Default)]
pub(super) struct Placement {
    /// (node, first block, end block) per member.
    members: Vec<(u32, u64, u64)>,
    /// Node of each CPU (index = CPU number), from sysfs; empty if unknown.
    cpu_nodes: Vec<u32>,
}

impl Placement {
    /// `members` as (node, first block, end block); nothing to place with fewer than two
    /// distinct nodes.
    pub(super) fn new(members: Vec<(u32, u64, u64)>) -> Self {
        let first = members.first().map(|m| m.0);
        if members.iter().all(|m| Some(m.0) == first) {
            return Self::default();
        }
        Self {
            members,
            cpu_nodes: cpu_nodes(),
        }
    }

    /// The node this thread writes from, if known.
    fn current_node(&self) -> Option<u32> {
        THREAD_NODE.with(Cell::get).or_else(|| {
            let cpu = nix::sched::sched_getcpu().ok()?;
            self.cpu_nodes.get(cpu).copied()
        })
    }

    /// The block range new data of this thread should prefer: its node's first member.
    pub(super) fn preferred(&self) -> Option<(u64, u64)> {
        if self.members.is_empty() {
            return None;
        }
        let node = self.current_node()?;
        self.members
            .iter()
            .find(|m| m.0 == node)
            .map(|&(_, first, end)| (first, end))
    }
}

/// Node of each CPU from `/sys/devices/system/node/node*/cpulist` (empty when unreadable).
fn cpu_nodes() -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(node) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(list) = std::fs::read_to_string(entry.path().join("cpulist")) else {
            continue;
        };
        for cpu in parse_cpu_list(&list) {
            if cpu < 1 << 16 {
                if out.len() <= cpu {
                    out.resize(cpu + 1, u32::MAX);
                }
                out[cpu] = node;
            }
        }
    }
    out
}

/// The CPUs of a sysfs CPU list ("0-3,8,10-11"); malformed parts are skipped.
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
            out.extend(a..=b.min(a.saturating_add(1 << 16)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("x,2"), vec![2]);
    }

    #[test]
    fn the_hook_picks_the_member_of_the_node() {
        let p = Placement::new(vec![(0, 0, 100), (1, 200, 300)]);
        set_thread_node(Some(1));
        assert_eq!(p.preferred(), Some((200, 300)));
        set_thread_node(Some(0));
        assert_eq!(p.preferred(), Some((0, 100)));
        set_thread_node(Some(7));
        assert_eq!(p.preferred(), None);
        set_thread_node(None);
        // One node only: nothing to steer.
        assert_eq!(
            Placement::new(vec![(3, 0, 100), (3, 200, 300)]).preferred(),
            None
        );
    }
}
