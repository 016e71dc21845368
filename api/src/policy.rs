//! Who may do what: Nova's default policy, reduced to the three roles Zova knows.
//!
//! `reader` reads its project, `member` also creates and changes its project's servers and key
//! pairs, `admin` does everything in every project. A project never sees another project's
//! servers: those are a 404, not a 403, so their existence does not leak.

use crate::{ApiError, Call};

/// Nova's refusal, naming the rule.
fn refuse(rule: &str) -> ApiError {
    ApiError::Forbidden(format!("Policy doesn't allow {rule} to be performed."))
}

pub(crate) fn has_role(call: &Call, role: &str) -> bool {
    call.context.roles.iter().any(|r| r == role)
}

/// Admin-only rules: services, hypervisors, flavor management, forcing a host.
pub(crate) fn admin(call: &Call, rule: &str) -> Result<(), ApiError> {
    if call.is_admin() {
        Ok(())
    } else {
        Err(refuse(rule))
    }
}

/// Rules that change a project's resources: members and admins.
pub(crate) fn member(call: &Call, rule: &str) -> Result<(), ApiError> {
    if call.is_admin() || has_role(call, "member") {
        Ok(())
    } else {
        Err(refuse(rule))
    }
}

/// Rules that read a project's resources: any role on the project.
pub(crate) fn reader(call: &Call, rule: &str) -> Result<(), ApiError> {
    if call.is_admin() || has_role(call, "member") || has_role(call, "reader") {
        Ok(())
    } else {
        Err(refuse(rule))
    }
}
