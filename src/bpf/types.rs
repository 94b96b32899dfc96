//! The skeleton's shared types (bpf/include/kmesh.h) as bytes for map
//! access, and their conversions to and from std addresses and ports.

use super::skel::types::*;

/// Plain-old-data view of the skeleton's shared types. Implemented only for
/// the generated structs, which consist of u32 fields (no padding).
pub trait Pod: Copy + Default + 'static {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: implementors are repr(C) structs of u32/u64 fields without
        // padding, generated from bpf/include/kmesh.h.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != std::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; every bit pattern is a valid u32.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
}

impl Pod for addr_key {}
impl Pod for service_value {}
impl Pod for workload_value {}
impl Pod for endpoint_key {}
impl Pod for endpoint_value {}
impl Pod for port_key {}
impl Pod for backend_addr {}
impl Pod for manage_value {}
impl Pod for config_value {}
impl Pod for sock_key {}
impl Pod for waypoint {}
impl Pod for authz_dst {}
impl Pod for authz_class {}
impl Pod for authz_port_key {}
impl Pod for authz_id_key {}
impl Pod for authz_src_key {}
impl Pod for authz_verdict_key {}
impl Pod for authz_verdict {}
impl Pod for lb_key {}
impl Pod for lb_table {}
impl Pod for limit_id {}
impl Pod for svc_conns {}
impl Pod for conn_note {}
impl Pod for bucket_key {}
impl Pod for u32 {}
impl Pod for u64 {}

impl sock_key {
    /// The key of the connection's other end.
    pub fn mirror(&self) -> Self {
        sock_key {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            netns: self.netns,
        }
    }
}

impl backend_addr {
    /// One address per family (the model allows at most one of each).
    pub fn from_ips(ips: &[std::net::IpAddr]) -> Self {
        let mut b = backend_addr::default();
        for ip in ips {
            match ip {
                std::net::IpAddr::V4(v4) => {
                    b.has_ip4 = 1;
                    b.ip4 = ip4_to_map(*v4);
                }
                std::net::IpAddr::V6(_) => {
                    b.has_ip6 = 1;
                    b.ip6 = kmesh_addr::from_ip(*ip);
                }
            }
        }
        b
    }

    pub fn to_ips(&self) -> Vec<std::net::IpAddr> {
        let mut v = Vec::new();
        if self.has_ip4 != 0 {
            v.push(ip4_from_map(self.ip4).into());
        }
        if self.has_ip6 != 0 {
            v.push(self.ip6.to_ip());
        }
        v
    }
}

impl addr_key {
    pub fn from_ip(ip: std::net::IpAddr) -> Self {
        addr_key {
            addr: kmesh_addr::from_ip(ip),
        }
    }
}

impl kmesh_addr {
    /// 16-byte form used by the maps: IPv4 becomes ::ffff:a.b.c.d.
    pub fn from_ip(ip: std::net::IpAddr) -> Self {
        let v6 = match ip {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        let o = v6.octets();
        let mut ip6 = [0u32; 4];
        for (i, w) in ip6.iter_mut().enumerate() {
            *w = u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap());
        }
        kmesh_addr { ip6 }
    }

    /// The address whose 16 bytes (as the maps and the data path's events
    /// hold them) start at `o` in `b`; None where `b` is too short.
    pub fn ip_at(b: &[u8], o: usize) -> Option<std::net::IpAddr> {
        let mut a = kmesh_addr::default();
        for (i, w) in a.ip6.iter_mut().enumerate() {
            *w = u32::from_ne_bytes(b.get(o + 4 * i..o + 4 * i + 4)?.try_into().ok()?);
        }
        Some(a.to_ip())
    }

    pub fn to_ip(&self) -> std::net::IpAddr {
        let mut o = [0u8; 16];
        for (i, w) in self.ip6.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = std::net::Ipv6Addr::from(o);
        match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(v6),
        }
    }
}

/// Port as stored in the maps: network order in the low 16 bits.
pub fn port_to_map(port: u16) -> u32 {
    u32::from(port.to_be())
}

pub fn port_from_map(v: u32) -> u16 {
    u16::from_be(v as u16)
}

/// IPv4 as stored in backend_value.ip4 (network order in memory).
pub fn ip4_to_map(ip: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip4_from_map(v: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(v.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_round_trip_maps_v4() {
        let v4: std::net::IpAddr = "10.96.0.10".parse().unwrap();
        let a = kmesh_addr::from_ip(v4);
        assert_eq!(a.ip6[0], 0);
        assert_eq!(a.ip6[2], 0x0000ffffu32.to_be());
        assert_eq!(a.ip6[3], ip4_to_map("10.96.0.10".parse().unwrap()));
        assert_eq!(a.to_ip(), v4);
        let v6: std::net::IpAddr = "fd00:96::10".parse().unwrap();
        assert_eq!(kmesh_addr::from_ip(v6).to_ip(), v6);
    }

    #[test]
    fn port_is_network_order_in_low_bits() {
        let p = port_to_map(8080);
        assert_eq!((p as u16).to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(port_from_map(p), 8080);
    }
}
