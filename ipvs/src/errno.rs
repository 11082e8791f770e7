//! Names and meanings of the errno values the IPVS family returns, so an error can read
//! "File exists (EEXIST)". Owns only this table; it must not decide what an errno means for
//! the caller (that is `client`'s and `reconcile`'s business).

/// `(errno, name, meaning)` for the values ip_vs_ctl.c and generic netlink return.
const TABLE: &[(i32, &str, &str)] = &[
    (1, "EPERM", "Operation not permitted (needs CAP_NET_ADMIN)"),
    (2, "ENOENT", "No such file or directory"),
    (3, "ESRCH", "No such service"),
    (7, "E2BIG", "Argument list too long"),
    (12, "ENOMEM", "Cannot allocate memory"),
    (13, "EACCES", "Permission denied"),
    (14, "EFAULT", "Bad address"),
    (16, "EBUSY", "Device or resource busy"),
    (17, "EEXIST", "File exists"),
    (19, "ENODEV", "No such device"),
    (22, "EINVAL", "Invalid argument"),
    (28, "ENOSPC", "No space left on device"),
    (34, "ERANGE", "Numerical result out of range"),
    (71, "EPROTO", "Protocol error"),
    (90, "EMSGSIZE", "Message too long"),
    (93, "EPROTONOSUPPORT", "Protocol not supported"),
    (95, "EOPNOTSUPP", "Operation not supported"),
    (
        97,
        "EAFNOSUPPORT",
        "Address family not supported by protocol",
    ),
    (105, "ENOBUFS", "No buffer space available"),
    (524, "ENOTSUPP", "Operation not supported by the kernel"),
];

/// `"File exists (EEXIST)"`; unknown values read `"errno 1234"`.
pub fn describe(errno: i32) -> String {
    match TABLE.iter().find(|(n, _, _)| *n == errno) {
        Some((_, name, meaning)) => format!("{meaning} ({name})"),
        None => format!("errno {errno}"),
    }
}

/// The symbolic name, e.g. `"EEXIST"`.
pub fn name(errno: i32) -> Option<&'static str> {
    TABLE
        .iter()
        .find(|(n, _, _)| *n == errno)
        .map(|(_, name, _)| *name)
}

pub const ENOENT: i32 = 2;
pub const ESRCH: i32 = 3;
pub const EEXIST: i32 = 17;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_known_and_unknown() {
        assert_eq!(describe(17), "File exists (EEXIST)");
        assert_eq!(describe(3), "No such service (ESRCH)");
        assert_eq!(describe(4242), "errno 4242");
        assert_eq!(name(2), Some("ENOENT"));
    }
}
