//! The tables, written by hand to match `migrations/*/up.sql` column for column.
//!
//! Integer keys are `INTEGER PRIMARY KEY` in SQLite (so they alias the rowid) but are declared
//! `BigInt` here: SQLite stores them as 64-bit, and the Rust side uses `i64` ids everywhere so
//! a PostgreSQL `BIGSERIAL` key maps onto the same structs.

diesel::table! {
    services (id) {
        id -> BigInt,
        host -> Text,
        binary -> Text,
        topic -> Text,
        rpc_endpoint -> Text,
        disabled -> Bool,
        disabled_reason -> Nullable<Text>,
        report_count -> BigInt,
        created_at -> Timestamp,
        updated_at -> Nullable<Timestamp>,
        deleted -> BigInt,
        rpc_public_key -> Nullable<Text>,
        forced_down -> Bool,
    }
}

diesel::table! {
    compute_nodes (id) {
        id -> BigInt,
        host -> Text,
        hypervisor_hostname -> Text,
        hypervisor_type -> Text,
        vcpus -> BigInt,
        memory_mb -> BigInt,
        local_gb -> BigInt,
        vcpus_used -> BigInt,
        memory_mb_used -> BigInt,
        local_gb_used -> BigInt,
        free_ram_mb -> BigInt,
        free_disk_gb -> BigInt,
        running_vms -> BigInt,
        extra_resources -> Text,
        created_at -> Timestamp,
        updated_at -> Nullable<Timestamp>,
        deleted -> BigInt,
        placed_vcpus -> BigInt,
        placed_memory_mb -> BigInt,
        placed_disk_mb -> BigInt,
    }
}

diesel::table! {
    allocations (id) {
        id -> BigInt,
        instance_uuid -> Text,
        compute_node_id -> BigInt,
        vcpus -> BigInt,
        memory_mb -> BigInt,
        disk_mb -> BigInt,
        created_at -> Timestamp,
    }
}

diesel::table! {
    flavor_extra_specs (id) {
        id -> BigInt,
        flavor_id -> BigInt,
        spec_key -> Text,
        spec_value -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    flavors (id) {
        id -> BigInt,
        flavorid -> Text,
        name -> Text,
        vcpus -> BigInt,
        memory_mb -> BigInt,
        root_gb -> BigInt,
        ephemeral_gb -> BigInt,
        swap_mb -> BigInt,
        is_public -> Bool,
        disabled -> Bool,
        created_at -> Timestamp,
        deleted -> BigInt,
    }
}

diesel::table! {
    images (id) {
        id -> BigInt,
        uuid -> Text,
        name -> Text,
        disk_format -> Text,
        container_format -> Text,
        status -> Text,
        min_disk -> BigInt,
        min_ram -> BigInt,
        size_bytes -> BigInt,
        location -> Nullable<Text>,
        created_at -> Timestamp,
        deleted -> BigInt,
    }
}

diesel::table! {
    instances (id) {
        id -> BigInt,
        uuid -> Text,
        display_name -> Text,
        project_id -> Text,
        user_id -> Text,
        flavorid -> Text,
        image_ref -> Text,
        vcpus -> BigInt,
        memory_mb -> BigInt,
        root_gb -> BigInt,
        ephemeral_gb -> BigInt,
        swap_mb -> BigInt,
        vm_state -> Text,
        task_state -> Nullable<Text>,
        power_state -> Integer,
        host -> Nullable<Text>,
        node -> Nullable<Text>,
        scheduler_hints -> Text,
        metadata -> Text,
        reservation_id -> Text,
        launch_index -> Integer,
        launched_at -> Nullable<Timestamp>,
        terminated_at -> Nullable<Timestamp>,
        created_at -> Timestamp,
        updated_at -> Nullable<Timestamp>,
        deleted_at -> Nullable<Timestamp>,
        deleted -> BigInt,
        description -> Nullable<Text>,
        key_name -> Nullable<Text>,
        flavor_snapshot -> Text,
    }
}

diesel::table! {
    instance_actions (id) {
        id -> BigInt,
        action -> Text,
        instance_uuid -> Text,
        request_id -> Text,
        user_id -> Text,
        project_id -> Text,
        start_time -> Timestamp,
        finish_time -> Nullable<Timestamp>,
        message -> Nullable<Text>,
        deleted -> BigInt,
    }
}

diesel::table! {
    instance_faults (id) {
        id -> BigInt,
        instance_uuid -> Text,
        code -> Integer,
        message -> Text,
        details -> Text,
        host -> Nullable<Text>,
        created_at -> Timestamp,
        deleted -> BigInt,
    }
}

diesel::table! {
    key_pairs (id) {
        id -> BigInt,
        name -> Text,
        user_id -> Text,
        fingerprint -> Text,
        public_key -> Text,
        key_type -> Text,
        created_at -> Timestamp,
        deleted -> BigInt,
    }
}

diesel::table! {
    quotas (id) {
        id -> BigInt,
        project_id -> Text,
        resource -> Text,
        hard_limit -> BigInt,
        created_at -> Timestamp,
        updated_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    networks (id) {
        id -> BigInt,
        name -> Text,
        cidr -> Text,
        gateway -> Text,
        bridge -> Nullable<Text>,
        created_at -> Timestamp,
        deleted -> BigInt,
    }
}

diesel::table! {
    fixed_ips (id) {
        id -> BigInt,
        network_id -> BigInt,
        address -> Text,
        instance_uuid -> Nullable<Text>,
        mac -> Nullable<Text>,
        allocated_at -> Nullable<Timestamp>,
    }
}

diesel::joinable!(allocations -> compute_nodes (compute_node_id));
diesel::joinable!(fixed_ips -> networks (network_id));

// Compute nodes are joined to their service by host name, not by a foreign key (as in Nova, a
// node can report before its service row exists), so the join condition is spelled out in SQL.
diesel::allow_tables_to_appear_in_same_query!(
    services,
    compute_nodes,
    allocations,
    flavors,
    flavor_extra_specs,
    images,
    instances,
    instance_actions,
    instance_faults,
    key_pairs,
    quotas,
    projects,
    users,
    role_assignments,
    tokens,
    networks,
    fixed_ips,
);

// Identity (a Keystone v3 subset); see migrations/2025-04-02-000000_identity.

diesel::table! {
    projects (id) {
        id -> BigInt,
        uuid -> Text,
        name -> Text,
        domain_id -> Text,
        description -> Text,
        enabled -> Bool,
        created_at -> Timestamp,
        deleted -> BigInt,
    }
}

diesel::table! {
    users (id) {
        id -> BigInt,
        uuid -> Text,
        name -> Text,
        domain_id -> Text,
        password_hash -> Text,
        default_project_uuid -> Nullable<Text>,
        enabled -> Bool,
        created_at -> Timestamp,
        deleted -> BigInt,
    }
}

diesel::table! {
    role_assignments (id) {
        id -> BigInt,
        user_uuid -> Text,
        project_uuid -> Text,
        role -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    tokens (id) {
        id -> BigInt,
        token_hash -> Text,
        user_uuid -> Text,
        project_uuid -> Nullable<Text>,
        issued_at -> Timestamp,
        expires_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
    }
}
