//! The UNIX sockets' `socket_mode`, `socket_group` and
//! `allow_world_writable` (in `[defaults]`, a `[[site]]`, a
//! `[[federation]]`): the mode written unambiguously, the group known, a
//! world-writable socket only when it is meant.

use super::super::SocketOwnership;
use super::super::raw::{Field, RawSite, Scalar};
use super::{Validator, key_of};

impl Validator<'_> {
    /// `socket_mode`, `socket_group` and `allow_world_writable` over `base`.
    pub(super) fn socket(&mut self, raw: &RawSite, base: &SocketOwnership, prefix: &str) -> SocketOwnership {
        let mut s = *base;
        let mode_key = key_of(prefix, "socket_mode");
        let mode_here = self.mode(&raw.socket_mode, &mode_key);
        if let Some(m) = mode_here {
            s.mode = m;
        }
        if let Some(g) = self.group(&raw.socket_group, &key_of(prefix, "socket_group")) {
            s.group = Some(g);
        }
        let allow_key = key_of(prefix, "allow_world_writable");
        if let Some(a) = self.flag(&raw.allow_world_writable, &allow_key) {
            s.allow_world_writable = a;
        }
        if s.mode & 0o002 != 0 && !s.allow_world_writable {
            let why = "lets every local user connect to the socket (and query every host or send commands): \
                       set allow_world_writable = true if that is meant, or give the clients' group access with \
                       socket_group and a mode such as \"0660\"";
            // A mode written here and refused was reported already.
            match (&raw.socket_mode, &raw.allow_world_writable) {
                (Some(m), _) if mode_here.is_some() => {
                    self.err(m.span(), &mode_key, format!("\"{:04o}\" {why}", s.mode))
                }
                (None, Some(a)) => {
                    self.err(a.span(), &allow_key, format!("socket_mode \"{:04o}\" (from [defaults]) {why}", s.mode))
                }
                _ => {}
            }
        }
        s
    }

    /// A socket mode: a string of octal digits (`"0660"`, as chmod takes
    /// it) or a TOML octal number (`0o660`); a decimal number is refused,
    /// as it is ambiguous (660 is not 0o660).
    fn mode(&mut self, v: &Field, key: &str) -> Option<u32> {
        let v = v.as_ref()?;
        let advice = "write it as a string of octal digits such as \"0660\" (as chmod takes it) or as a TOML \
                      octal number such as 0o660";
        let octal = |t: &str| !t.is_empty() && t.bytes().all(|b| (b'0'..=b'7').contains(&b));
        let bits = match v.get_ref() {
            Scalar::Text(t) => {
                let three = t.strip_prefix('0').filter(|d| d.len() == 3).unwrap_or(t);
                if three.len() == 3 && octal(three) {
                    u32::from_str_radix(three, 8).map_err(|e| e.to_string())
                } else if t.len() == 4 && octal(t) {
                    Err(format!(
                        "\"{t}\" sets special bits (set-user-ID, set-group-ID, sticky), which mean nothing on a \
                         socket; write three octal digits such as \"0660\""
                    ))
                } else {
                    Err(format!("\"{t}\" is not a mode: {advice}"))
                }
            }
            Scalar::Int(n) => {
                // The parser reads 0o660 and 432 as the same number: the
                // text tells them apart.
                let text = self.text.get(v.span()).unwrap_or("");
                match u32::try_from(*n) {
                    _ if !text.starts_with("0o") => {
                        Err(format!("the decimal number {n} is ambiguous as a mode (660 is not 0o660): {advice}"))
                    }
                    Ok(b) if b <= 0o777 => Ok(b),
                    _ => Err(format!("{text} is not a mode of a socket: its permission bits go up to 0o777")),
                }
            }
            _ => {
                self.wrong_type(v, key, "a mode such as \"0660\" or 0o660");
                return None;
            }
        };
        match bits {
            Ok(b) => Some(b),
            Err(m) => {
                self.err(v.span(), key, m);
                None
            }
        }
    }

    /// A group: its name (looked up now, so check-config finds a missing
    /// one) or its numeric id (used as it is, as chown does).
    fn group(&mut self, v: &Field, key: &str) -> Option<u32> {
        let v = v.as_ref()?;
        let gid = |n: i64| u32::try_from(n).ok().filter(|g| *g != u32::MAX);
        let id = match v.get_ref() {
            Scalar::Int(n) => gid(*n).ok_or_else(|| format!("{n} is not a group id (0..=4294967294)")),
            Scalar::Text(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
                t.parse().ok().and_then(gid).ok_or_else(|| format!("{t} is not a group id (0..=4294967294)"))
            }
            Scalar::Text(t) if t.is_empty() => Err("must not be empty".to_owned()),
            Scalar::Text(t) => match nix::unistd::Group::from_name(t) {
                Ok(Some(g)) => Ok(g.gid.as_raw()),
                Ok(None) => Err(format!("there is no group '{t}' on this machine (`getent group {t}` finds none)")),
                Err(e) => Err(format!("cannot look up group '{t}': {e}")),
            },
            _ => {
                self.wrong_type(v, key, "a group name or a numeric group id");
                return None;
            }
        };
        match id {
            Ok(g) => Some(g),
            Err(m) => {
                self.err(v.span(), key, m);
                None
            }
        }
    }
}
