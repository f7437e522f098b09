//! Process-wide limits and address checks.

use std::io;
use std::net::SocketAddr;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft
/// limit in force afterwards. Every connection costs a descriptor, and
/// distributions ship a soft limit of 1024 that a busy daemon exhausts long
/// before its own connection caps.
#[cfg(unix)]
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(io::Error::last_os_error());
        }
        r.rlim_cur = r.rlim_max;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    Ok(r.rlim_cur as u64)
}

/// Whether `addr` is reachable from this host only (127.0.0.0/8, `::1`, or
/// an IPv4-mapped loopback address). The unspecified addresses (`0.0.0.0`,
/// `::`) are not: they listen on every interface.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses() {
        for (a, want) in [
            ("127.0.0.1:1", true),
            ("127.9.0.1:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("0.0.0.0:1", false),
            ("[::]:1", false),
            ("10.0.0.1:1", false),
            ("[::ffff:10.0.0.1]:1", false),
        ] {
            let addr: SocketAddr = a.parse().expect("address");
            assert_eq!(is_loopback(&addr), want, "{a}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn nofile_limit_reaches_the_hard_limit() {
        let soft = raise_nofile_limit().expect("raise");
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
        #[allow(clippy::unnecessary_cast)]
        let cur = r.rlim_cur as u64;
        assert_eq!(soft, cur);
        assert_eq!(r.rlim_cur, r.rlim_max);
    }
}
