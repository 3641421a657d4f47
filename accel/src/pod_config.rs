//! A registration (`remora_init::accel::Registration`) encoded as the `meshed_pods` map
//! value the connect4/6 programs read.
//!
//! The map value has fixed arrays ([`MAX_PORT_RANGES`], [`MAX_CIDRS`] per family and
//! list). A registration with longer lists is refused as a whole: half its lists would
//! capture connections its iptables rules do not, or the reverse, so such a pod stays on
//! the iptables path.

use std::net::IpAddr;

use remora_init::accel::{Capture, Registration};
use remora_init::config::{Cidr, OutboundCapture};

use crate::maps::{
    Cidr4, Cidr6, MAX_CIDRS, MAX_PORT_RANGES, POD_INCLUDE_LIST, POD_IPV6, PodConfig, PortRange,
};

/// A registration whose lists do not fit the map value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} has {count} entries, the accelerator takes at most {max}")]
pub struct DoesNotFit {
    /// The registration's field (with the family for CIDR lists).
    pub field: &'static str,
    pub count: usize,
    pub max: usize,
}

/// Encodes a checked registration. IPv6 lists are left out when IPv6 is not captured:
/// the programs never read them then, as `captures_outbound` never does.
pub fn encode(reg: &Registration, capture: &Capture) -> Result<PodConfig, DoesNotFit> {
    let mut cfg = PodConfig {
        proxy_uid: reg.proxy_uid,
        proxy_gid: reg.proxy_gid,
        outbound_port: reg.outbound_port,
        ..PodConfig::default()
    };
    if reg.ipv6 {
        cfg.flags |= POD_IPV6;
    }

    let ports = &capture.skip_outbound_ports;
    fits("skipOutboundPorts", ports.len(), MAX_PORT_RANGES)?;
    for (slot, r) in cfg.skip_ports.iter_mut().zip(ports) {
        *slot = PortRange {
            first: r.first(),
            last: r.last(),
        };
    }
    cfg.n_skip_ports = count_u8(ports.len());

    let (n4, n6) = fill(
        &capture.skip_outbound_cidrs,
        reg.ipv6,
        &mut cfg.skip4,
        &mut cfg.skip6,
        ["skipOutboundCidrs (IPv4)", "skipOutboundCidrs (IPv6)"],
    )?;
    cfg.n_skip4 = n4;
    cfg.n_skip6 = n6;

    if let OutboundCapture::Cidrs(include) = &capture.outbound {
        cfg.flags |= POD_INCLUDE_LIST;
        let (n4, n6) = fill(
            include,
            reg.ipv6,
            &mut cfg.include4,
            &mut cfg.include6,
            ["includeOutboundCidrs (IPv4)", "includeOutboundCidrs (IPv6)"],
        )?;
        cfg.n_include4 = n4;
        cfg.n_include6 = n6;
    }
    Ok(cfg)
}

fn fits(field: &'static str, count: usize, max: usize) -> Result<(), DoesNotFit> {
    if count > max {
        return Err(DoesNotFit { field, count, max });
    }
    Ok(())
}

/// A count already checked against a maximum of 8.
fn count_u8(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

fn fill(
    cidrs: &[Cidr],
    ipv6: bool,
    v4: &mut [Cidr4; MAX_CIDRS],
    v6: &mut [Cidr6; MAX_CIDRS],
    fields: [&'static str; 2],
) -> Result<(u8, u8), DoesNotFit> {
    let list4: Vec<Cidr4> = cidrs.iter().filter_map(cidr4).collect();
    let list6: Vec<Cidr6> = if ipv6 {
        cidrs.iter().filter_map(cidr6).collect()
    } else {
        Vec::new()
    };
    fits(fields[0], list4.len(), MAX_CIDRS)?;
    fits(fields[1], list6.len(), MAX_CIDRS)?;
    for (slot, c) in v4.iter_mut().zip(&list4) {
        *slot = *c;
    }
    for (slot, c) in v6.iter_mut().zip(&list6) {
        *slot = *c;
    }
    Ok((count_u8(list4.len()), count_u8(list6.len())))
}

fn cidr4(c: &Cidr) -> Option<Cidr4> {
    let IpAddr::V4(a) = c.addr() else {
        return None;
    };
    let mask = u32::MAX
        .checked_shl(32 - u32::from(c.prefix()))
        .unwrap_or(0);
    Some(Cidr4 {
        addr: u32::from_ne_bytes(a.octets()),
        mask: u32::from_ne_bytes(mask.to_be_bytes()),
    })
}

fn cidr6(c: &Cidr) -> Option<Cidr6> {
    let IpAddr::V6(a) = c.addr() else {
        return None;
    };
    let mask = u128::MAX
        .checked_shl(128 - u32::from(c.prefix()))
        .unwrap_or(0);
    Some(Cidr6 {
        addr: words(a.octets()),
        mask: words(mask.to_be_bytes()),
    })
}

/// 16 network-order bytes as the four `__u32`s the kernel compares.
pub fn words(b: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_init::config::Config;

    fn registration(edit: impl FnOnce(&mut Registration)) -> (Registration, Capture) {
        let mut reg = Registration::new(42, &Config::default());
        edit(&mut reg);
        let capture = reg
            .capture()
            .unwrap_or_else(|e| panic!("bad test input: {e:?}"));
        (reg, capture)
    }

    fn be(ip: [u8; 4]) -> u32 {
        u32::from_ne_bytes(ip)
    }

    #[test]
    fn encodes_every_list_in_network_order() -> Result<(), DoesNotFit> {
        let (reg, capture) = registration(|r| {
            r.proxy_uid = 1337;
            r.proxy_gid = 1338;
            r.outbound_port = 15001;
            r.skip_outbound_ports = "3306,9000-9100".into();
            r.skip_outbound_cidrs = "169.254.169.254/32,10.1.0.0/16,fd00::/8".into();
            r.include_outbound_cidrs = "10.0.0.0/8,2001:db8::/32".into();
            r.ipv6 = true;
        });
        let cfg = encode(&reg, &capture)?;
        assert_eq!(
            (cfg.proxy_uid, cfg.proxy_gid, cfg.outbound_port),
            (1337, 1338, 15001)
        );
        assert_eq!(cfg.flags, POD_IPV6 | POD_INCLUDE_LIST);
        assert_eq!(cfg.n_skip_ports, 2);
        assert_eq!(
            cfg.skip_ports[0],
            PortRange {
                first: 3306,
                last: 3306
            }
        );
        assert_eq!(
            cfg.skip_ports[1],
            PortRange {
                first: 9000,
                last: 9100
            }
        );
        assert_eq!((cfg.n_skip4, cfg.n_skip6), (2, 1));
        assert_eq!(
            cfg.skip4[0],
            Cidr4 {
                addr: be([169, 254, 169, 254]),
                mask: be([255, 255, 255, 255])
            }
        );
        assert_eq!(
            cfg.skip4[1],
            Cidr4 {
                addr: be([10, 1, 0, 0]),
                mask: be([255, 255, 0, 0])
            }
        );
        assert_eq!(
            cfg.skip6[0].addr,
            words([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(
            cfg.skip6[0].mask,
            words([0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!((cfg.n_include4, cfg.n_include6), (1, 1));
        assert_eq!(
            cfg.include4[0],
            Cidr4 {
                addr: be([10, 0, 0, 0]),
                mask: be([255, 0, 0, 0])
            }
        );
        let mut mask = [0u8; 16];
        mask[..4].fill(0xff);
        assert_eq!(cfg.include6[0].mask, words(mask));
        // Unused slots stay zero.
        assert_eq!(cfg.skip_ports[2], PortRange::default());
        Ok(())
    }

    #[test]
    fn capture_all_and_no_ipv6_leave_the_v6_lists_out() -> Result<(), DoesNotFit> {
        let (reg, capture) = registration(|r| {
            r.ipv6 = false;
            r.skip_outbound_cidrs = "0.0.0.0/0,::/0".into();
        });
        let cfg = encode(&reg, &capture)?;
        assert_eq!(cfg.flags, 0);
        assert_eq!((cfg.n_skip4, cfg.n_skip6, cfg.n_include4), (1, 0, 0));
        assert_eq!(cfg.skip4[0], Cidr4 { addr: 0, mask: 0 });
        Ok(())
    }

    #[test]
    fn lists_that_do_not_fit_are_refused_whole() {
        fn many(n: u16, f: impl Fn(u16) -> String) -> String {
            (1..=n).map(f).collect::<Vec<_>>().join(",")
        }
        type Edit = Box<dyn Fn(&mut Registration)>;
        let cases: [(Edit, &str, usize); 4] = [
            (
                Box::new(|r| r.skip_outbound_ports = many(9, |i: u16| (1000 + i).to_string())),
                "skipOutboundPorts",
                9,
            ),
            (
                Box::new(|r| r.skip_outbound_cidrs = many(9, |i: u16| format!("10.{i}.0.0/16"))),
                "skipOutboundCidrs (IPv4)",
                9,
            ),
            (
                Box::new(|r| {
                    r.ipv6 = true;
                    r.include_outbound_cidrs = many(10, |i: u16| format!("fd{i:02x}::/16"));
                }),
                "includeOutboundCidrs (IPv6)",
                10,
            ),
            (
                Box::new(|r| {
                    r.include_outbound_cidrs = many(12, |i: u16| format!("10.{i}.0.0/16"))
                }),
                "includeOutboundCidrs (IPv4)",
                12,
            ),
        ];
        for (edit, field, count) in cases {
            let (reg, capture) = registration(|r| edit(r));
            let err = encode(&reg, &capture).err();
            assert_eq!(
                err,
                Some(DoesNotFit {
                    field,
                    count,
                    max: 8
                })
            );
        }
        // Exactly eight fits.
        let (reg, capture) =
            registration(|r| r.skip_outbound_ports = many(8, |i: u16| (1000 + i).to_string()));
        assert!(encode(&reg, &capture).is_ok_and(|c| c.n_skip_ports == 8));
        // Nine IPv6 CIDRs are fine when IPv6 is not captured: they are never read.
        let (reg, capture) = registration(|r| {
            r.ipv6 = false;
            r.skip_outbound_cidrs = many(9, |i: u16| format!("fd{i:02x}::/16"));
        });
        assert!(encode(&reg, &capture).is_ok_and(|c| c.n_skip6 == 0));
    }
}
