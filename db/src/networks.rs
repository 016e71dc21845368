//! Fixed-IP pools, as nova-network kept them: a network owns one row per usable address, and an
//! instance holds at most one of them (with its MAC) from its build until it is deleted or goes
//! to error.

use std::net::Ipv4Addr;

use diesel::prelude::*;

use crate::kept::Kept;
use crate::schema::{fixed_ips, instances, networks};
use crate::{now, Db, DbError, Result};
use crate::{AnyConnection, DbBackend};

/// The prefixes a pool may have: a /16 is 65 534 rows, a /30 the smallest with a free address
/// beside its gateway.
const PREFIXES: std::ops::RangeInclusive<u8> = 16..=30;

/// Nova's MAC prefix (fa:16:3e): locally administered, unicast.
const MAC_PREFIX: &str = "fa:16:3e";

/// How often a random MAC that clashes with one in use is drawn again before giving up.
const MAC_ATTEMPTS: usize = 8;

/// A network with a fixed-IP pool.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = networks)]
pub struct Network {
    pub id: i64,
    pub name: String,
    pub cidr: String,
    pub gateway: String,
    pub bridge: Option<String>,
}

/// A network and its pool: how many addresses it has, and how many instances hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkUsage {
    pub network: Network,
    pub pool: i64,
    pub held: i64,
}

/// An address allocated to an instance, with what its NIC needs to know of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIp {
    pub instance_uuid: String,
    pub address: String,
    pub mac: String,
    pub network: String,
    pub cidr: String,
    pub gateway: String,
    pub bridge: Option<String>,
}

type FixedIpRow = (
    Option<String>,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
);

const FIXED_IP_COLUMNS: (
    fixed_ips::instance_uuid,
    fixed_ips::address,
    fixed_ips::mac,
    networks::name,
    networks::cidr,
    networks::gateway,
    networks::bridge,
) = (
    fixed_ips::instance_uuid,
    fixed_ips::address,
    fixed_ips::mac,
    networks::name,
    networks::cidr,
    networks::gateway,
    networks::bridge,
);

fn fixed_ip(row: FixedIpRow) -> FixedIp {
    let (instance_uuid, address, mac, network, cidr, gateway, bridge) = row;
    FixedIp {
        instance_uuid: instance_uuid.unwrap_or_default(),
        address,
        mac: mac.unwrap_or_default(),
        network,
        cidr,
        gateway,
        bridge,
    }
}

/// The host addresses of `cidr` (IPv4, prefix 16..=30, no host bits set) other than `gateway`,
/// in ascending order; the gateway must be one of the host addresses.
pub fn pool_addresses(cidr: &str, gateway: &str) -> Result<Vec<Ipv4Addr>> {
    let invalid = |why: &str| DbError::Invalid(format!("network {cidr}: {why}"));
    let (base, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| invalid("not in address/prefix form"))?;
    let base: Ipv4Addr = base.parse().map_err(|_| invalid("not an IPv4 address"))?;
    let prefix: u8 = prefix.parse().map_err(|_| invalid("bad prefix length"))?;
    if !PREFIXES.contains(&prefix) {
        return Err(invalid("the prefix length must be between 16 and 30"));
    }
    let mask = u32::MAX << (32 - prefix);
    let first = u32::from(base);
    if first & !mask != 0 {
        return Err(invalid("host bits are set"));
    }
    let broadcast = first | !mask;
    let gateway: Ipv4Addr = gateway
        .parse()
        .map_err(|_| invalid("the gateway is not an IPv4 address"))?;
    let gw = u32::from(gateway);
    if gw <= first || gw >= broadcast {
        return Err(invalid("the gateway is not a host address of the network"));
    }
    Ok((first + 1..broadcast)
        .filter(|a| *a != gw)
        .map(Ipv4Addr::from)
        .collect())
}

/// The first and last address of an IPv4 `address/prefix`, None when it is not one.
fn cidr_range(cidr: &str) -> Option<(u32, u32)> {
    let (base, prefix) = cidr.split_once('/')?;
    let base = u32::from(base.parse::<Ipv4Addr>().ok()?);
    let prefix: u32 = prefix.parse().ok()?;
    let mask = u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0);
    let first = base & mask;
    Some((first, first | !mask))
}

/// Creates a network and its pool inside the caller's transaction.
pub(crate) fn insert_network(
    conn: &mut AnyConnection,
    name: &str,
    cidr: &str,
    gateway: &str,
    bridge: Option<&str>,
) -> Result<Network> {
    let addresses = pool_addresses(cidr, gateway)?;
    // Two pools over one range would give two instances the same address.
    if let Some(new) = cidr_range(cidr) {
        let live: Vec<(String, String)> = networks::table
            .filter(networks::deleted.eq(0))
            .select((networks::name, networks::cidr))
            .load(conn)?;
        let overlapping = live.iter().find(|(_, other)| {
            cidr_range(other).is_some_and(|(first, last)| first <= new.1 && new.0 <= last)
        });
        if let Some((other_name, other_cidr)) = overlapping {
            return Err(DbError::Invalid(format!(
                "network {cidr} overlaps network {other_name} ({other_cidr})"
            )));
        }
    }
    let taken: i64 = networks::table
        .filter(networks::deleted.eq(0))
        .filter(networks::name.eq(name))
        .count()
        .get_result(conn)?;
    if taken > 0 {
        return Err(DbError::Duplicate {
            kind: "network",
            name: name.to_string(),
        });
    }
    let network: Network = diesel::insert_into(networks::table)
        .values((
            networks::name.eq(name),
            networks::cidr.eq(cidr),
            networks::gateway.eq(gateway),
            networks::bridge.eq(bridge),
            networks::created_at.eq(now()),
        ))
        .returning(<Network as Selectable<DbBackend>>::construct_selection())
        .get_result(conn)?;
    let rows: Vec<_> = addresses
        .iter()
        .map(|a| {
            (
                fixed_ips::network_id.eq(network.id),
                fixed_ips::address.eq(a.to_string()),
            )
        })
        .collect();
    // Both databases cap the bound parameters of one statement; a /16 goes in chunks. A
    // multi-row insert is written per database: the two spell it differently.
    for chunk in rows.chunks(4096) {
        let insert = diesel::insert_into(fixed_ips::table).values(chunk);
        match conn {
            AnyConnection::Sqlite(c) => insert.execute(c)?,
            AnyConnection::Postgresql(c) => insert.execute(c)?,
        };
    }
    Ok(network)
}

/// Frees whatever address `instance_uuid` holds, inside the caller's transaction.
pub(crate) fn release_fixed_ip(
    conn: &mut AnyConnection,
    instance_uuid: &str,
) -> QueryResult<usize> {
    direct!(conn, c => {
        Kept(
            diesel::update(fixed_ips::table.filter(fixed_ips::instance_uuid.eq(instance_uuid)))
                .set((
                    fixed_ips::instance_uuid.eq(None::<String>),
                    fixed_ips::mac.eq(None::<String>),
                    fixed_ips::allocated_at.eq(None::<chrono::NaiveDateTime>),
                ))
                .returning(fixed_ips::id),
        )
        .changed(c)
    })
}

fn held(conn: &mut AnyConnection, uuids: &[String]) -> QueryResult<Vec<FixedIp>> {
    let rows: Vec<FixedIpRow> = direct!(conn, c => {
        let query = fixed_ips::table
            .inner_join(networks::table)
            .order(fixed_ips::id.asc())
            .select(FIXED_IP_COLUMNS)
            .into_boxed();
        // One instance (a build's allocation, a server's show) by `=`: that statement stays
        // prepared, where diesel prepares an `IN` list afresh each time.
        let query = match uuids {
            [one] => query.filter(fixed_ips::instance_uuid.eq(one)),
            many => query.filter(fixed_ips::instance_uuid.eq_any(many)),
        };
        query.load(c)
    })?;
    Ok(rows.into_iter().map(fixed_ip).collect())
}

/// A MAC with Nova's prefix and three random bytes.
fn random_mac() -> String {
    let bytes = uuid::Uuid::new_v4();
    let [a, b, c, ..] = *bytes.as_bytes();
    format!("{MAC_PREFIX}:{a:02x}:{b:02x}:{c:02x}")
}

impl Db {
    /// Creates network `name` with a pool of every host address of `cidr` but the gateway.
    /// `bridge` is the host bridge its guests join (`None`: QEMU's user-mode NIC, which needs nothing on the host).
    pub fn network_create(
        &self,
        name: &str,
        cidr: &str,
        gateway: &str,
        bridge: Option<&str>,
    ) -> Result<Network> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| insert_network(conn, name, cidr, gateway, bridge))
    }

    /// Each live network, oldest first, with the size of its pool and how many of its
    /// addresses instances hold.
    pub fn network_usage(&self) -> Result<Vec<NetworkUsage>> {
        let mut conn = self.conn()?;
        let networks: Vec<Network> = networks::table
            .filter(networks::deleted.eq(0))
            .order(networks::id.asc())
            .select(Network::as_select())
            .load(&mut conn)?;
        let mut usage = Vec::with_capacity(networks.len());
        for network in networks {
            let pool: i64 = fixed_ips::table
                .filter(fixed_ips::network_id.eq(network.id))
                .count()
                .get_result(&mut conn)?;
            let held: i64 = fixed_ips::table
                .filter(fixed_ips::network_id.eq(network.id))
                .filter(fixed_ips::instance_uuid.is_not_null())
                .count()
                .get_result(&mut conn)?;
            usage.push(NetworkUsage {
                network,
                pool,
                held,
            });
        }
        Ok(usage)
    }

    /// Deletes network `name` and its pool. Refused ([`DbError::Conflict`]) while an instance
    /// holds one of its addresses: that instance's NIC would point at nothing.
    pub fn network_delete(&self, name: &str) -> Result<Network> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let network: Network = networks::table
                .filter(networks::deleted.eq(0))
                .filter(networks::name.eq(name))
                .select(Network::as_select())
                .first(conn)
                .optional()?
                .ok_or_else(|| DbError::NotFound {
                    kind: "network",
                    id: name.to_string(),
                })?;
            let held: i64 = fixed_ips::table
                .filter(fixed_ips::network_id.eq(network.id))
                .filter(fixed_ips::instance_uuid.is_not_null())
                .count()
                .get_result(conn)?;
            if held > 0 {
                return Err(DbError::Conflict(format!(
                    "network {name} has {held} address(es) held by instances; delete those first"
                )));
            }
            diesel::delete(fixed_ips::table.filter(fixed_ips::network_id.eq(network.id)))
                .execute(conn)?;
            // Nova's soft delete: `deleted` takes the row id, so the name can be used again.
            diesel::update(networks::table.filter(networks::id.eq(network.id)))
                .set(networks::deleted.eq(network.id))
                .execute(conn)?;
            Ok(network)
        })
    }

    /// The live networks, oldest first.
    pub fn networks(&self) -> Result<Vec<Network>> {
        let mut conn = self.conn()?;
        Ok(networks::table
            .filter(networks::deleted.eq(0))
            .order(networks::id.asc())
            .select(Network::as_select())
            .load(&mut conn)?)
    }

    /// Gives `instance_uuid` the lowest free address of `network` (of any network, oldest first,
    /// when `None`) and a fresh MAC. An instance that holds an address already gets it back, so
    /// a retried build does not take a second one. [`DbError::Exhausted`] when none is free;
    /// [`DbError::NotFound`] unless the instance is live and not in error (its address would
    /// never be released).
    pub fn fixed_ip_allocate(&self, instance_uuid: &str, network: Option<&str>) -> Result<FixedIp> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| allocate_fixed_ip(conn, instance_uuid, network))
    }

    /// Frees the address `instance_uuid` holds; freeing none is not an error.
    pub fn fixed_ip_release(&self, instance_uuid: &str) -> Result<()> {
        let mut conn = self.conn()?;
        release_fixed_ip(&mut conn, instance_uuid)?;
        Ok(())
    }

    /// The addresses `instance_uuid` holds (none or one).
    pub fn fixed_ips_of(&self, instance_uuid: &str) -> Result<Vec<FixedIp>> {
        self.fixed_ips_of_instances(&[instance_uuid.to_string()])
    }

    /// The addresses held by any of `instance_uuids`, in one query (for a server list).
    pub fn fixed_ips_of_instances(&self, instance_uuids: &[String]) -> Result<Vec<FixedIp>> {
        let mut conn = self.conn()?;
        Ok(held(&mut conn, instance_uuids)?)
    }
}

/// The body of [`Db::fixed_ip_allocate`], inside the caller's write transaction.
pub(crate) fn allocate_fixed_ip(
    conn: &mut AnyConnection,
    instance_uuid: &str,
    network: Option<&str>,
) -> Result<FixedIp> {
    let live: i64 = instances::table
        .filter(instances::deleted.eq(0))
        .filter(instances::uuid.eq(instance_uuid))
        .filter(instances::vm_state.ne("error"))
        .count()
        .get_result(conn)?;
    if live == 0 {
        return Err(DbError::NotFound {
            kind: "instance",
            id: instance_uuid.to_string(),
        });
    }
    take_fixed_ip(conn, instance_uuid, network)
}

/// [`allocate_fixed_ip`] for an instance the caller has just found live (a build's update to
/// spawning, in the same transaction).
pub(crate) fn take_fixed_ip(
    conn: &mut AnyConnection,
    instance_uuid: &str,
    network: Option<&str>,
) -> Result<FixedIp> {
    if let Some(ip) = held(conn, &[instance_uuid.to_string()])?.into_iter().next() {
        return Ok(ip);
    }
    let pools: Vec<Network> = direct!(&mut *conn, c => {
        let mut pools = networks::table
            .filter(networks::deleted.eq(0))
            .order(networks::id.asc())
            .select(Network::as_select())
            .into_boxed();
        if let Some(name) = network {
            pools = pools.filter(networks::name.eq(name));
        }
        pools.load(c)
    })?;
    if pools.is_empty() {
        return Err(match network {
            Some(name) => DbError::NotFound {
                kind: "network",
                id: name.to_string(),
            },
            None => DbError::Exhausted(
                "No network is defined to take a fixed IP address from".to_string(),
            ),
        });
    }
    let ids: Vec<i64> = pools.iter().map(|n| n.id).collect();
    // One form per number of networks, which are few.
    let free: Option<(i64, i64, String)> = direct!(&mut *conn, c => {
        Kept(
            fixed_ips::table
                .filter(fixed_ips::network_id.eq_any(&ids))
                .filter(fixed_ips::instance_uuid.is_null())
                .order((fixed_ips::network_id.asc(), fixed_ips::id.asc()))
                .select((fixed_ips::id, fixed_ips::network_id, fixed_ips::address))
                .limit(1),
        )
        .get_result(c)
        .optional()
    })?;
    let Some((free, network_id, address)) = free else {
        let names: Vec<String> = pools
            .iter()
            .map(|n| format!("{} ({})", n.name, n.cidr))
            .collect();
        return Err(DbError::Exhausted(format!(
            "No fixed IP address is free in network {}",
            names.join(", ")
        )));
    };
    let mut mac = random_mac();
    for _ in 1..MAC_ATTEMPTS {
        let clash: i64 = direct!(&mut *conn, c => {
            fixed_ips::table
                .filter(fixed_ips::mac.eq(&mac))
                .count()
                .get_result(c)
        })?;
        if clash == 0 {
            break;
        }
        mac = random_mac();
    }
    // Conditional on the row still being free: the immediate transaction already keeps
    // other writers out, this keeps the statement honest on its own.
    let at = now();
    let taken = direct!(&mut *conn, c => {
        Kept(
            diesel::update(
                fixed_ips::table
                    .filter(fixed_ips::id.eq(free))
                    .filter(fixed_ips::instance_uuid.is_null()),
            )
            .set((
                fixed_ips::instance_uuid.eq(instance_uuid),
                fixed_ips::mac.eq(&mac),
                fixed_ips::allocated_at.eq(at),
            ))
            .returning(fixed_ips::id),
        )
        .changed(c)
    })?;
    if taken == 0 {
        return Err(DbError::Conflict(format!(
            "the fixed IP chosen for instance {instance_uuid} was taken meanwhile"
        )));
    }
    let pool = pools
        .into_iter()
        .find(|n| n.id == network_id)
        .ok_or_else(|| DbError::Conflict(format!("network {network_id} went away")))?;
    Ok(FixedIp {
        instance_uuid: instance_uuid.to_string(),
        address,
        mac,
        network: pool.name,
        cidr: pool.cidr,
        gateway: pool.gateway,
        bridge: pool.bridge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{new_instance, open_temp};
    use crate::NewFault;

    /// A fresh database with live instances called `uuids`.
    fn with_instances(uuids: &[&str]) -> (tempfile::TempDir, Db) {
        let (dir, db) = open_temp();
        for uuid in uuids {
            db.instance_create(&new_instance(uuid, "p"), "req").unwrap();
        }
        (dir, db)
    }

    #[test]
    fn pools_are_the_host_addresses_but_the_gateway() {
        let pool = pool_addresses("10.0.0.0/24", "10.0.0.1").unwrap();
        assert_eq!(pool.len(), 253);
        assert_eq!(pool[0], Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(pool[252], Ipv4Addr::new(10, 0, 0, 254));
        assert_eq!(
            pool_addresses("192.168.5.0/30", "192.168.5.1").unwrap(),
            vec![Ipv4Addr::new(192, 168, 5, 2)]
        );
        assert_eq!(
            pool_addresses("10.1.0.0/16", "10.1.0.1").unwrap().len(),
            65_533
        );
    }

    #[test]
    fn malformed_networks_are_refused() {
        for (cidr, gateway) in [
            ("10.0.0.0", "10.0.0.1"),
            ("10.0.0.0/8", "10.0.0.1"),
            ("10.0.0.0/31", "10.0.0.1"),
            ("10.0.0.0/x", "10.0.0.1"),
            ("10.0.0.1/24", "10.0.0.2"),
            ("fd00::/64", "fd00::1"),
            ("10.0.0.0/24", "10.0.1.1"),
            ("10.0.0.0/24", "10.0.0.0"),
            ("10.0.0.0/24", "10.0.0.255"),
            ("10.0.0.0/24", "gateway"),
        ] {
            assert!(
                matches!(pool_addresses(cidr, gateway), Err(DbError::Invalid(_))),
                "{cidr} {gateway}"
            );
        }
    }

    /// The spawning record and the address are one transaction: with the pool empty, the
    /// instance is left as it was, not marked spawning on a host it will never run on.
    #[test]
    fn a_build_starts_spawning_with_its_address_or_not_at_all() {
        let (_dir, db) = with_instances(&["a", "b"]);
        db.network_delete("private").unwrap();
        db.network_create("tiny", "192.168.5.0/30", "192.168.5.1", None)
            .unwrap();
        let spawning = crate::InstanceChanges {
            task_state: Some(Some("spawning".into())),
            host: Some(Some("node-1".into())),
            ..Default::default()
        };
        let start = |uuid: &str| {
            let record = crate::Record::StartSpawning {
                uuid,
                changes: &spawning,
                expected_vm_state: Some("building"),
                expected_task: crate::ExpectedTask::Any,
            };
            match db.record(&record)? {
                crate::Recorded::FixedIp(ip) => Ok(ip),
                other => panic!("a start_spawning record gave {other:?}"),
            }
        };

        let ip = start("a").unwrap();
        assert_eq!(ip.address, "192.168.5.2");
        let a = db.instance_get("a").unwrap().unwrap();
        assert_eq!(a.task_state.as_deref(), Some("spawning"));
        assert_eq!(a.host.as_deref(), Some("node-1"));
        // A retried start gets the same address back.
        assert_eq!(start("a").unwrap().address, "192.168.5.2");

        assert!(matches!(start("b"), Err(DbError::Exhausted(_))));
        let b = db.instance_get("b").unwrap().unwrap();
        assert_eq!(b.task_state.as_deref(), Some("scheduling"));
        assert_eq!(b.host, None);

        // A deleted instance is refused before anything is written.
        db.instance_destroy("a").unwrap();
        assert!(start("a").is_err());
    }

    #[test]
    fn a_fresh_database_has_the_private_network() {
        let (_dir, db) = open_temp();
        let networks = db.networks().unwrap();
        assert_eq!(networks.len(), 1);
        assert_eq!(networks[0].name, "private");
        assert_eq!(networks[0].cidr, "10.0.0.0/24");
        assert_eq!(networks[0].gateway, "10.0.0.1");
        assert!(matches!(
            db.network_create("private", "10.9.0.0/24", "10.9.0.1", None),
            Err(DbError::Duplicate { .. })
        ));
    }

    #[test]
    fn networks_report_their_use_and_are_deleted_only_when_unused() {
        let (_dir, db) = with_instances(&["a"]);
        db.network_create("lab", "192.168.7.0/29", "192.168.7.1", Some("br-lab"))
            .unwrap();
        db.fixed_ip_allocate("a", Some("lab")).unwrap();
        let usage = db.network_usage().unwrap();
        let names: Vec<_> = usage.iter().map(|u| u.network.name.as_str()).collect();
        assert_eq!(names, ["private", "lab"]);
        assert_eq!((usage[0].pool, usage[0].held), (253, 0));
        assert_eq!((usage[1].pool, usage[1].held), (5, 1));
        assert_eq!(usage[1].network.bridge.as_deref(), Some("br-lab"));

        assert!(matches!(
            db.network_delete("lab"),
            Err(DbError::Conflict(_))
        ));
        for (overlapping, gateway) in [
            ("192.168.7.0/29", "192.168.7.1"),
            ("192.168.7.4/30", "192.168.7.5"),
            ("192.168.0.0/16", "192.168.0.1"),
            ("10.0.0.0/16", "10.0.0.1"),
        ] {
            assert!(
                matches!(
                    db.network_create("other", overlapping, gateway, None),
                    Err(DbError::Invalid(ref why)) if why.contains("overlaps")
                ),
                "{overlapping}"
            );
        }
        db.network_create("next", "192.168.7.8/29", "192.168.7.9", None)
            .unwrap();
        db.network_delete("next").unwrap();
        assert_eq!(db.network_usage().unwrap().len(), 2);
        db.instance_destroy("a").unwrap();
        let deleted = db.network_delete("lab").unwrap();
        assert_eq!(deleted.cidr, "192.168.7.0/29");
        assert_eq!(db.networks().unwrap().len(), 1);
        assert!(matches!(
            db.network_delete("lab"),
            Err(DbError::NotFound { .. })
        ));
        // The name and the range can be used again.
        db.network_create("lab", "192.168.7.0/29", "192.168.7.1", None)
            .unwrap();
        assert_eq!(db.network_usage().unwrap()[1].pool, 5);
    }

    #[test]
    fn addresses_go_lowest_first_once_per_instance_with_nova_macs() {
        let (_dir, db) = with_instances(&["a", "b"]);
        let a = db.fixed_ip_allocate("a", None).unwrap();
        let b = db.fixed_ip_allocate("b", Some("private")).unwrap();
        assert_eq!(
            (a.address.as_str(), b.address.as_str()),
            ("10.0.0.2", "10.0.0.3")
        );
        assert_eq!(a.network, "private");
        assert_eq!(a.gateway, "10.0.0.1");
        assert_eq!(a.instance_uuid, "a");
        for mac in [&a.mac, &b.mac] {
            assert!(mac.starts_with("fa:16:3e:") && mac.len() == 17, "{mac}");
        }
        assert_ne!(a.mac, b.mac);
        assert_eq!(db.fixed_ip_allocate("a", None).unwrap(), a, "idempotent");
        assert_eq!(db.fixed_ips_of("a").unwrap(), vec![a.clone()]);
        let both = db
            .fixed_ips_of_instances(&["a".to_string(), "b".to_string(), "c".to_string()])
            .unwrap();
        assert_eq!(both, vec![a, b]);
    }

    #[test]
    fn a_released_address_is_the_next_one_given() {
        let (_dir, db) = with_instances(&["a", "b", "c"]);
        db.fixed_ip_allocate("a", None).unwrap();
        db.fixed_ip_allocate("b", None).unwrap();
        db.fixed_ip_release("a").unwrap();
        db.fixed_ip_release("a").unwrap();
        assert!(db.fixed_ips_of("a").unwrap().is_empty());
        assert_eq!(db.fixed_ip_allocate("c", None).unwrap().address, "10.0.0.2");
    }

    #[test]
    fn an_exhausted_pool_says_which_network() {
        let (_dir, db) = with_instances(&["a", "b"]);
        db.network_create("tiny", "192.168.7.0/30", "192.168.7.1", Some("br0"))
            .unwrap();
        let only = db.fixed_ip_allocate("a", Some("tiny")).unwrap();
        assert_eq!(only.address, "192.168.7.2");
        assert_eq!(only.bridge.as_deref(), Some("br0"));
        match db.fixed_ip_allocate("b", Some("tiny")) {
            Err(DbError::Exhausted(message)) => assert_eq!(
                message,
                "No fixed IP address is free in network tiny (192.168.7.0/30)"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            db.fixed_ip_allocate("b", Some("nowhere")),
            Err(DbError::NotFound { .. })
        ));
        assert!(
            matches!(
                db.fixed_ip_allocate("gone", None),
                Err(DbError::NotFound { .. })
            ),
            "no address for an instance that is not there"
        );
    }

    #[test]
    fn destroying_or_failing_an_instance_frees_its_address() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("i-1", "p"), "req-1")
            .unwrap();
        db.instance_create(&new_instance("i-2", "p"), "req-2")
            .unwrap();
        db.fixed_ip_allocate("i-1", None).unwrap();
        db.fixed_ip_allocate("i-2", None).unwrap();
        db.instance_destroy("i-1").unwrap();
        assert!(db.fixed_ips_of("i-1").unwrap().is_empty());
        db.instance_set_error(
            "i-2",
            &NewFault {
                instance_uuid: "i-2".into(),
                code: 500,
                message: "boom".into(),
                details: String::new(),
                host: None,
            },
        )
        .unwrap();
        assert!(db.fixed_ips_of("i-2").unwrap().is_empty());
        assert!(matches!(
            db.fixed_ip_allocate("i-2", None),
            Err(DbError::NotFound { .. })
        ));
    }
}
