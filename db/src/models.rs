//! Rows as Rust structs: one read struct per table (fields named like the columns) and the
//! insert/update structs the methods take.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::Serialize;

use crate::schema::{
    compute_nodes, flavors, images, instance_actions, instance_faults, instances, services,
};

/// A running Zova service (`zova-compute`, `zova-conductor`, ...) on one host.
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = services, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct Service {
    pub id: i64,
    pub host: String,
    pub binary: String,
    pub topic: String,
    pub rpc_endpoint: String,
    pub disabled: bool,
    pub disabled_reason: Option<String>,
    pub report_count: i64,
    pub created_at: NaiveDateTime,
    pub updated_at: Option<NaiveDateTime>,
    pub deleted: i64,
    /// The CURVE public key (Z85) of the service's RPC endpoint, when it uses CURVE.
    pub rpc_public_key: Option<String>,
    /// Set by an operator (os-services force-down): down whatever the heartbeat says.
    pub forced_down: bool,
}

/// A hypervisor's capacity and usage as last reported by its compute service.
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = compute_nodes, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct ComputeNode {
    pub id: i64,
    pub host: String,
    pub hypervisor_hostname: String,
    pub hypervisor_type: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub local_gb: i64,
    pub vcpus_used: i64,
    pub memory_mb_used: i64,
    pub local_gb_used: i64,
    pub free_ram_mb: i64,
    pub free_disk_gb: i64,
    pub running_vms: i64,
    /// A JSON object of resources beyond the fixed columns.
    pub extra_resources: String,
    pub created_at: NaiveDateTime,
    pub updated_at: Option<NaiveDateTime>,
    pub deleted: i64,
    /// What schedulers have placed here (the sum of the node's allocations): vCPUs, MB, MB.
    pub placed_vcpus: i64,
    pub placed_memory_mb: i64,
    pub placed_disk_mb: i64,
}

/// A flavor: the size of an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = flavors, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct Flavor {
    pub id: i64,
    pub flavorid: String,
    pub name: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub root_gb: i64,
    pub ephemeral_gb: i64,
    pub swap_mb: i64,
    pub is_public: bool,
    pub disabled: bool,
    pub created_at: NaiveDateTime,
    pub deleted: i64,
}

/// A bootable image (Zova keeps its own small image catalogue instead of Glance).
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = images, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct Image {
    pub id: i64,
    pub uuid: String,
    pub name: String,
    pub disk_format: String,
    pub container_format: String,
    pub status: String,
    pub min_disk: i64,
    pub min_ram: i64,
    pub size_bytes: i64,
    pub location: Option<String>,
    pub created_at: NaiveDateTime,
    pub deleted: i64,
}

/// A server. The flavor's sizes are copied in at creation, as in Nova, so resizing or deleting
/// the flavor later does not change what the instance holds.
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = instances, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct Instance {
    pub id: i64,
    pub uuid: String,
    pub display_name: String,
    pub project_id: String,
    pub user_id: String,
    pub flavorid: String,
    pub image_ref: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub root_gb: i64,
    pub ephemeral_gb: i64,
    pub swap_mb: i64,
    pub vm_state: String,
    pub task_state: Option<String>,
    pub power_state: i32,
    pub host: Option<String>,
    pub node: Option<String>,
    /// A JSON object.
    pub scheduler_hints: String,
    /// A JSON object of user metadata.
    pub metadata: String,
    pub reservation_id: String,
    pub launch_index: i32,
    pub launched_at: Option<NaiveDateTime>,
    pub terminated_at: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: Option<NaiveDateTime>,
    pub deleted_at: Option<NaiveDateTime>,
    pub deleted: i64,
    /// The user's description (microversion 2.19).
    pub description: Option<String>,
    /// The key pair named at create.
    pub key_name: Option<String>,
    /// A JSON object: the flavor's `name` and `extra_specs` when the server was created.
    pub flavor_snapshot: String,
}

/// One user-visible operation on an instance (`create`, `delete`, `reboot`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = instance_actions, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct InstanceAction {
    pub id: i64,
    pub action: String,
    pub instance_uuid: String,
    pub request_id: String,
    pub user_id: String,
    pub project_id: String,
    pub start_time: NaiveDateTime,
    pub finish_time: Option<NaiveDateTime>,
    pub message: Option<String>,
    pub deleted: i64,
}

/// Why an instance went to `error`, shown to the user as the server's `fault`.
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = instance_faults, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct InstanceFault {
    pub id: i64,
    pub instance_uuid: String,
    pub code: i32,
    pub message: String,
    pub details: String,
    pub host: Option<String>,
    pub created_at: NaiveDateTime,
    pub deleted: i64,
}

/// A new instance row; `Db::instance_create` adds `created_at`.
#[derive(Debug, Clone, PartialEq, Insertable)]
#[diesel(table_name = instances)]
pub struct NewInstance {
    pub uuid: String,
    pub display_name: String,
    pub project_id: String,
    pub user_id: String,
    pub flavorid: String,
    pub image_ref: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub root_gb: i64,
    pub ephemeral_gb: i64,
    pub swap_mb: i64,
    pub vm_state: String,
    pub task_state: Option<String>,
    pub power_state: i32,
    /// A JSON object (`"{}"` when there are none).
    pub scheduler_hints: String,
    /// A JSON object (`"{}"` when there is none).
    pub metadata: String,
    pub reservation_id: String,
    pub launch_index: i32,
    pub description: Option<String>,
    pub key_name: Option<String>,
    /// A JSON object (`"{}"` when unknown): the flavor's `name` and `extra_specs`.
    pub flavor_snapshot: String,
}

/// A new fault row; the method adds `created_at`.
#[derive(Debug, Clone, PartialEq, Insertable)]
#[diesel(table_name = instance_faults)]
pub struct NewFault {
    pub instance_uuid: String,
    pub code: i32,
    pub message: String,
    pub details: String,
    pub host: Option<String>,
}

/// What a compute service reports about one hypervisor; `Db::compute_node_upsert` derives
/// `free_ram_mb` and `free_disk_gb` from it.
#[derive(Debug, Clone, PartialEq, Insertable, AsChangeset)]
#[diesel(table_name = compute_nodes)]
pub struct ComputeNodeValues {
    pub host: String,
    pub hypervisor_hostname: String,
    pub hypervisor_type: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub local_gb: i64,
    pub vcpus_used: i64,
    pub memory_mb_used: i64,
    pub local_gb_used: i64,
    pub running_vms: i64,
    /// A JSON object (`"{}"` when there are none).
    pub extra_resources: String,
}

/// A partial update of an instance: `None` leaves a column alone, `Some(None)` sets it to NULL.
#[derive(Debug, Clone, Default, PartialEq, AsChangeset)]
#[diesel(table_name = instances, treat_none_as_null = false)]
pub struct InstanceChanges {
    pub vm_state: Option<String>,
    pub task_state: Option<Option<String>>,
    pub power_state: Option<i32>,
    pub host: Option<Option<String>>,
    pub node: Option<Option<String>>,
    pub launched_at: Option<Option<NaiveDateTime>>,
    pub display_name: Option<String>,
    pub description: Option<Option<String>>,
}
