//! Resource usage from the kernel: CPU and memory of a process's cgroups (v1, hybrid or
//! v2, found through `/proc/<pid>/cgroup`), network counters of its network namespace
//! (`/proc/<pid>/net/dev`), with the fields the CRI's stats messages carry, computed as
//! containerd computes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One reading of a cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used, nanoseconds.
    pub cpu_ns: u64,
    /// Memory charged to the cgroup, bytes.
    pub memory: u64,
    /// Memory minus inactive file pages (what the kubelet evicts on).
    pub working_set: u64,
    /// Anonymous memory.
    pub rss: u64,
    /// Page faults and major page faults.
    pub page_faults: u64,
    /// Major page faults.
    pub major_page_faults: u64,
    /// The memory limit, when one is set.
    pub limit: Option<u64>,
}

/// Where a process's cgroups are: per v1 controller, and the v2 path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cgroups {
    v1: HashMap<String, String>,
    v2: Option<String>,
}

impl Cgroups {
    /// The cgroups of process `pid`; `None` when it is gone.
    pub fn of(pid: i64) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        Some(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let mut cgroups = Cgroups::default();
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next(), fields.next(), fields.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            if controllers.is_empty() {
                cgroups.v2 = Some(path.to_string());
            } else {
                for controller in controllers.split(',') {
                    cgroups
                        .v1
                        .insert(controller.to_string(), format!("{controllers}\u{0}{path}"));
                }
            }
        }
        cgroups
    }

    /// The directory of `controller` under `root` (`/sys/fs/cgroup`): its v1 hierarchy
    /// when it has one, else the unified one.
    fn dir(&self, root: &Path, controller: &str) -> Option<PathBuf> {
        if let Some(entry) = self.v1.get(controller) {
            let (mount, path) = entry.split_once('\u{0}')?;
            return Some(root.join(mount).join(path.trim_start_matches('/')));
        }
        let path = self.v2.as_ref()?.trim_start_matches('/');
        let unified = if root.join("cgroup.controllers").exists() {
            root.to_path_buf()
        } else {
            root.join("unified")
        };
        Some(unified.join(path))
    }

    /// Reads CPU and memory under `root` (`/sys/fs/cgroup` on a node).
    pub fn usage(&self, root: &Path) -> Usage {
        let mut usage = Usage::default();
        if let Some(dir) = self
            .dir(root, "cpuacct")
            .filter(|d| d.join("cpuacct.usage").exists())
        {
            usage.cpu_ns = number(&dir.join("cpuacct.usage")).unwrap_or(0);
        } else if let Some(dir) = self.dir(root, "cpu") {
            let stat = keyed(&dir.join("cpu.stat"));
            usage.cpu_ns = stat.get("usage_usec").copied().unwrap_or(0) * 1000;
        }
        let Some(dir) = self.dir(root, "memory") else {
            return usage;
        };
        let stat = keyed(&dir.join("memory.stat"));
        if let Some(current) = number(&dir.join("memory.usage_in_bytes")) {
            usage.memory = current;
            usage.working_set =
                current.saturating_sub(stat.get("total_inactive_file").copied().unwrap_or(0));
            usage.rss = stat.get("total_rss").copied().unwrap_or(0);
            usage.page_faults = stat.get("total_pgfault").copied().unwrap_or(0);
            usage.major_page_faults = stat.get("total_pgmajfault").copied().unwrap_or(0);
            usage.limit = number(&dir.join("memory.limit_in_bytes")).filter(|l| *l < 1 << 62);
        } else if let Some(current) = number(&dir.join("memory.current")) {
            usage.memory = current;
            usage.working_set =
                current.saturating_sub(stat.get("inactive_file").copied().unwrap_or(0));
            usage.rss = stat.get("anon").copied().unwrap_or(0);
            usage.page_faults = stat.get("pgfault").copied().unwrap_or(0);
            usage.major_page_faults = stat.get("pgmajfault").copied().unwrap_or(0);
            usage.limit = number(&dir.join("memory.max"));
        }
        usage
    }
}

fn number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn keyed(path: &Path) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Per interface: `(name, rx_bytes, rx_errors, tx_bytes, tx_errors)` of the network
/// namespace process `pid` is in, loopback left out.
pub fn interfaces(pid: i64) -> Vec<(String, u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    parse_net_dev(&text)
}

fn parse_net_dev(text: &str) -> Vec<(String, u64, u64, u64, u64)> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            let n: Vec<u64> = counters
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (name != "lo" && n.len() >= 11).then(|| (name.to_string(), n[0], n[2], n[8], n[10]))
        })
        .collect()
}

/// How many processes a cgroup holds: its `pids` controller's count when it has one, else 1
/// for the live process it was found through.
pub fn process_count(cgroups: &Cgroups, root: &Path) -> u64 {
    cgroups
        .dir(root, "pids")
        .and_then(|d| number(&d.join("pids.current")))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_cgroups_are_read_with_containerds_arithmetic() {
        let root = tempfile::tempdir().unwrap();
        let text = "4:memory:/runtimed/c1\n2:cpu,cpuacct:/runtimed/c1\n0::/\n";
        let cgroups = Cgroups::parse(text);
        let memory = root.path().join("memory/runtimed/c1");
        let cpu = root.path().join("cpu,cpuacct/runtimed/c1");
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "123456\n").unwrap();
        std::fs::write(memory.join("memory.usage_in_bytes"), "1000\n").unwrap();
        std::fs::write(
            memory.join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        std::fs::write(
            memory.join("memory.stat"),
            "total_inactive_file 300\ntotal_rss 600\ntotal_pgfault 7\ntotal_pgmajfault 1\n",
        )
        .unwrap();
        let usage = cgroups.usage(root.path());
        assert_eq!(
            usage,
            Usage {
                cpu_ns: 123456,
                memory: 1000,
                working_set: 700,
                rss: 600,
                page_faults: 7,
                major_page_faults: 1,
                limit: None
            }
        );

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory").unwrap();
        let dir = v2.path().join("pods/c2");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 5\nuser_usec 3\n").unwrap();
        std::fs::write(dir.join("memory.current"), "2000\n").unwrap();
        std::fs::write(dir.join("memory.max"), "4096\n").unwrap();
        std::fs::write(
            dir.join("memory.stat"),
            "anon 100\ninactive_file 500\npgfault 2\npgmajfault 0\n",
        )
        .unwrap();
        let usage = Cgroups::parse("0::/pods/c2\n").usage(v2.path());
        assert_eq!(
            (usage.cpu_ns, usage.working_set, usage.rss, usage.limit),
            (5000, 1500, 100, Some(4096))
        );
    }

    #[test]
    fn net_dev_counters_skip_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  eth0:    2000      20    3    0    0     0          0         0     4000      40    5    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(text),
            [("eth0".to_string(), 2000, 3, 4000, 5)]
        );
    }
}
