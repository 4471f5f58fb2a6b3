//! Seccomp: which profile a CRI request asks for, and the RuntimeDefault profile.
//!
//! RuntimeDefault is containerd's default profile (the one Docker and Moby ship): every
//! syscall fails with EPERM unless listed, and the list grows with the capabilities in
//! the container's bounding set, so it must be built after them. No crate carries this
//! profile, so it is written here as data.

use crate::error::Error;
use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompOperator, LinuxSyscall,
};
use proto::cri;
use std::collections::HashSet;
use std::path::PathBuf;

/// The profile a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    Unconfined,
    RuntimeDefault,
    /// A profile file on the node (absolute path).
    Localhost(PathBuf),
}

/// The spec's seccomp section for a request's `seccomp` (or deprecated string) and the
/// process's bounding set; `None` is unconfined.
pub fn for_request(
    profile: Option<&cri::SecurityProfile>,
    deprecated_path: &str,
    bounding: &HashSet<Capability>,
) -> Result<Option<LinuxSeccomp>, Error> {
    self::profile(&requested(profile, deprecated_path)?, bounding)
}

/// What `seccomp` asks for, else what the deprecated `seccomp_profile_path` string asks
/// for (critest 1.26 and kubelets before 1.19 send only the string); neither is
/// Unconfined, as in containerd.
fn requested(
    profile: Option<&cri::SecurityProfile>,
    deprecated_path: &str,
) -> Result<Requested, Error> {
    use cri::security_profile::ProfileType;
    let Some(profile) = profile else {
        return from_path(deprecated_path);
    };
    let kind = profile.profile_type();
    if kind != ProfileType::Localhost && !profile.localhost_ref.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "seccomp profile {:?} given for type {}; only Localhost takes one",
            profile.localhost_ref,
            kind.as_str_name()
        )));
    }
    match kind {
        ProfileType::Unconfined => Ok(Requested::Unconfined),
        ProfileType::RuntimeDefault => Ok(Requested::RuntimeDefault),
        // containerd takes the reference with or without the string form's prefix.
        ProfileType::Localhost => localhost(
            profile
                .localhost_ref
                .strip_prefix("localhost/")
                .unwrap_or(&profile.localhost_ref),
        ),
    }
}

fn from_path(path: &str) -> Result<Requested, Error> {
    match path {
        "" | "unconfined" => Ok(Requested::Unconfined),
        "runtime/default" | "docker/default" => Ok(Requested::RuntimeDefault),
        _ => match path.strip_prefix("localhost/") {
            Some(file) => localhost(file),
            None => Err(Error::InvalidArgument(format!(
                "seccomp profile {path:?}: expected runtime/default, docker/default, \
                 unconfined or localhost/<absolute path>"
            ))),
        },
    }
}

fn localhost(path: &str) -> Result<Requested, Error> {
    let file = PathBuf::from(path);
    if !file.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "seccomp profile {path:?} is not an absolute path"
        )));
    }
    Ok(Requested::Localhost(file))
}

/// The spec's seccomp section for `requested` and the process's bounding set; `None` is
/// unconfined.
fn profile(
    requested: &Requested,
    bounding: &HashSet<Capability>,
) -> Result<Option<LinuxSeccomp>, Error> {
    match requested {
        Requested::Unconfined => Ok(None),
        Requested::RuntimeDefault => Ok(Some(runtime_default(bounding))),
        Requested::Localhost(path) => {
            let invalid = |e: &dyn std::fmt::Display| {
                Error::InvalidArgument(format!("seccomp profile {}: {e}", path.display()))
            };
            let text = std::fs::read(path).map_err(|e| invalid(&e))?;
            serde_json::from_slice(&text)
                .map(Some)
                .map_err(|e| invalid(&e))
        }
    }
}

/// Allowed for every container.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lsm_get_self_attr",
    "lsm_list_modules",
    "lsm_set_self_attr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "map_shadow_stack",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed from Linux 4.8 on, where seccomp sees the syscall a tracer rewrites (before it,
/// ptrace could step around the filter).
const ALLOWED_SINCE_4_8: &[&str] = &["process_vm_readv", "process_vm_writev", "ptrace"];

#[cfg(target_arch = "x86_64")]
const ARCHITECTURES: &[Arch] = &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32];
#[cfg(target_arch = "x86_64")]
const ALLOWED_ON_ARCH: &[&str] = &["arch_prctl", "modify_ldt"];

#[cfg(target_arch = "aarch64")]
const ARCHITECTURES: &[Arch] = &[Arch::ScmpArchArm, Arch::ScmpArchAarch64];
#[cfg(target_arch = "aarch64")]
const ALLOWED_ON_ARCH: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHITECTURES: &[Arch] = &[];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ALLOWED_ON_ARCH: &[&str] = &[];

/// Syscalls allowed only when the bounding set holds the capability that guards them.
const ALLOWED_WITH: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// `personality(2)` personas a container may switch to: PER_LINUX, PER_LINUX32,
/// UNAME26, UNAME26|PER_LINUX32, and the query 0xffffffff.
const PERSONAS: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// The namespace flags of clone(2) a container without CAP_SYS_ADMIN may not pass.
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// The index of clone(2)'s flags: s390 swaps its first two arguments.
const CLONE_FLAGS_ARG: usize = if cfg!(target_arch = "s390x") { 1 } else { 0 };

/// containerd's default profile for a process with `bounding` capabilities.
pub fn runtime_default(bounding: &HashSet<Capability>) -> LinuxSeccomp {
    let mut names: Vec<&str> = ALLOWED.iter().chain(ALLOWED_ON_ARCH).copied().collect();
    if crate::spec::kernel_at_least(4, 8) {
        names.extend(ALLOWED_SINCE_4_8);
    }
    for (cap, calls) in ALLOWED_WITH {
        if bounding.contains(cap) {
            names.extend(calls.iter());
        }
    }
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(*n));
    let mut syscalls = vec![allow(&names, vec![])];
    syscalls.extend(socket_rules());
    for persona in PERSONAS {
        syscalls.push(allow(
            &["personality"],
            vec![arg(0, persona, Op::ScmpCmpEq)],
        ));
    }
    if !bounding.contains(&Capability::SysAdmin) {
        let no_namespaces = LinuxSeccompArgBuilder::default()
            .index(CLONE_FLAGS_ARG)
            .value(CLONE_NAMESPACES)
            .value_two(0u64)
            .op(Op::ScmpCmpMaskedEq)
            .build()
            .expect("every field is set");
        syscalls.push(allow(&["clone"], vec![no_namespaces]));
        // ENOSYS rather than EPERM: glibc then falls back to clone(2), whose flags the rule
        // above can inspect (clone3 passes them in memory).
        let mut clone3 = allow(&["clone3"], vec![]);
        clone3.set_action(LinuxSeccompAction::ScmpActErrno);
        clone3.set_errno_ret(Some(libc::ENOSYS as u32));
        syscalls.push(clone3);
    }
    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActErrno);
    profile.set_architectures(Some(ARCHITECTURES.to_vec()));
    profile.set_syscalls(Some(syscalls));
    profile
}

type Op = LinuxSeccompOperator;

/// socket(2) for every address family but AF_ALG and AF_VSOCK. Three single-condition
/// rules, since runc turns several conditions on one argument into alternatives.
fn socket_rules() -> Vec<LinuxSyscall> {
    let alg = libc::AF_ALG as u64;
    let vsock = libc::AF_VSOCK as u64;
    [
        arg(0, alg, Op::ScmpCmpLt),
        arg(0, alg + 1, Op::ScmpCmpEq),
        arg(0, vsock, Op::ScmpCmpGt),
    ]
    .into_iter()
    .map(|a| allow(&["socket"], vec![a]))
    .collect()
}

fn allow(names: &[&str], args: Vec<LinuxSeccompArg>) -> LinuxSyscall {
    let mut syscall = LinuxSyscall::default();
    syscall.set_names(names.iter().map(|n| n.to_string()).collect());
    syscall.set_action(LinuxSeccompAction::ScmpActAllow);
    syscall.set_args((!args.is_empty()).then_some(args));
    syscall
}

fn arg(index: usize, value: u64, op: Op) -> LinuxSeccompArg {
    LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .op(op)
        .build()
        .expect("every field is set")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security_profile(
        kind: cri::security_profile::ProfileType,
        path: &str,
    ) -> cri::SecurityProfile {
        cri::SecurityProfile {
            profile_type: kind as i32,
            localhost_ref: path.into(),
        }
    }

    #[test]
    fn the_deprecated_string_is_read_when_no_profile_is_given() {
        assert_eq!(requested(None, "").unwrap(), Requested::Unconfined);
        assert_eq!(
            requested(None, "unconfined").unwrap(),
            Requested::Unconfined
        );
        assert_eq!(
            requested(None, "runtime/default").unwrap(),
            Requested::RuntimeDefault
        );
        assert_eq!(
            requested(None, "docker/default").unwrap(),
            Requested::RuntimeDefault
        );
        assert_eq!(
            requested(None, "localhost//etc/p.json").unwrap(),
            Requested::Localhost("/etc/p.json".into())
        );
        let bare = requested(None, "/etc/p.json").unwrap_err().to_string();
        assert!(bare.contains("\"/etc/p.json\""), "{bare}");
        assert!(requested(None, "localhost/p.json").is_err());
    }

    #[test]
    fn the_profile_field_wins_over_the_string() {
        use cri::security_profile::ProfileType;
        let default = security_profile(ProfileType::RuntimeDefault, "");
        assert_eq!(
            requested(Some(&default), "unconfined").unwrap(),
            Requested::RuntimeDefault
        );
        let relative = security_profile(ProfileType::Localhost, "p.json");
        assert!(requested(Some(&relative), "").is_err());
        let prefixed = security_profile(ProfileType::Localhost, "localhost//etc/p.json");
        assert_eq!(
            requested(Some(&prefixed), "").unwrap(),
            Requested::Localhost("/etc/p.json".into())
        );
        let stray = security_profile(ProfileType::RuntimeDefault, "/etc/p.json");
        assert!(requested(Some(&stray), "").is_err());
    }

    fn allowed(profile: &LinuxSeccomp, name: &str) -> Vec<LinuxSyscall> {
        let syscalls = profile.syscalls().clone().unwrap();
        syscalls
            .into_iter()
            .filter(|s| s.names().iter().any(|n| n == name))
            .collect()
    }

    #[test]
    fn without_sys_admin_namespaces_and_hostnames_are_refused() {
        let caps = HashSet::from([Capability::Chown, Capability::SysChroot]);
        let profile = runtime_default(&caps);
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert!(allowed(&profile, "sethostname").is_empty());
        assert!(allowed(&profile, "mount").is_empty());
        assert_eq!(allowed(&profile, "chroot").len(), 1);
        let clone = allowed(&profile, "clone");
        let args = clone[0].args().clone().unwrap();
        assert_eq!(args[0].op(), Op::ScmpCmpMaskedEq);
        assert_eq!(args[0].value(), CLONE_NAMESPACES);
        let clone3 = allowed(&profile, "clone3");
        assert_eq!(clone3[0].errno_ret(), Some(libc::ENOSYS as u32));
        assert_eq!(allowed(&profile, "socket").len(), 3);
        assert_eq!(allowed(&profile, "personality").len(), 5);
    }

    #[test]
    fn sys_admin_allows_clone_hostnames_and_mounts_once() {
        let caps = HashSet::from([Capability::SysAdmin, Capability::Syslog]);
        let profile = runtime_default(&caps);
        let clone = allowed(&profile, "clone");
        assert_eq!(clone.len(), 1);
        assert_eq!(clone[0].args(), &None);
        assert_eq!(allowed(&profile, "sethostname").len(), 1);
        assert_eq!(
            allowed(&profile, "clone3")[0].action(),
            LinuxSeccompAction::ScmpActAllow
        );
        let names = profile.syscalls().clone().unwrap()[0].names().clone();
        let syslog = names.iter().filter(|n| *n == "syslog").count();
        assert_eq!(syslog, 1, "a name held by two capabilities is listed once");
    }

    #[test]
    fn it_serialises_as_runc_reads_it() {
        let json = serde_json::to_value(runtime_default(&HashSet::new())).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        let socket = &json["syscalls"][1];
        assert_eq!(socket["names"], serde_json::json!(["socket"]));
        assert_eq!(socket["args"][0]["op"], "SCMP_CMP_LT");
        assert_eq!(socket["args"][0]["value"], 38);
    }

    #[test]
    fn a_localhost_profile_that_is_missing_or_not_json_is_named() {
        let dir = std::env::temp_dir().join(format!("seccomp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        for path in [dir.join("missing.json"), bad] {
            let err = profile(&Requested::Localhost(path.clone()), &HashSet::new()).unwrap_err();
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
