//! Identity: the admin bootstrap (like `keystone-manage bootstrap`), projects, users and role
//! assignments.

use std::collections::HashMap;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::identity::{hash_password, role_id, verify_password};
use db::{Db, DbError, Project, Role, User, BOOTSTRAP_NAME};

use super::{json_text, table, Format, ManageError};

/// Keystone's limits on names.
const MAX_PROJECT_NAME_LEN: usize = 64;
const MAX_USER_NAME_LEN: usize = 255;

#[derive(Debug, Subcommand)]
pub(super) enum ProjectCommand {
    /// Creates a project.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Lists the projects.
    List,
}

#[derive(Debug, Subcommand)]
pub(super) enum UserCommand {
    /// Creates a user; with --project, gives it ROLE there and makes it its default project.
    Create {
        name: String,
        /// Also taken from ZOVA_USER_PASSWORD, which keeps it off the command line (and out of
        /// `ps` and shell history).
        #[arg(long, env = "ZOVA_USER_PASSWORD", hide_env_values = true)]
        password: String,
        /// Project name or id.
        #[arg(long)]
        project: Option<String>,
        /// The role on --project.
        #[arg(long, requires = "project", default_value = "member")]
        role: String,
    },
    /// Lists the users.
    List,
}

#[derive(Debug, Subcommand)]
pub(super) enum RoleCommand {
    /// Gives a user a role on a project.
    Add {
        /// User name or id.
        #[arg(long)]
        user: String,
        /// Project name or id.
        #[arg(long)]
        project: String,
        role: String,
    },
    /// Takes a role away from a user on a project.
    Remove {
        #[arg(long)]
        user: String,
        #[arg(long)]
        project: String,
        role: String,
    },
    /// Lists the roles assigned to a user.
    List {
        #[arg(long)]
        user: String,
    },
}

pub(super) fn project(
    db: &Db,
    command: ProjectCommand,
    format: Format,
) -> Result<String, ManageError> {
    match command {
        ProjectCommand::Create { name, description } => {
            check_name("project", &name, MAX_PROJECT_NAME_LEN)?;
            let project = db.project_create(&name, &description)?;
            Ok(projects_output(&[project], format))
        }
        ProjectCommand::List => Ok(projects_output(&db.projects()?, format)),
    }
}

pub(super) fn user(db: &Db, command: UserCommand, format: Format) -> Result<String, ManageError> {
    match command {
        UserCommand::Create {
            name,
            password,
            project,
            role,
        } => {
            check_name("user", &name, MAX_USER_NAME_LEN)?;
            if password.is_empty() {
                return Err(ManageError::Invalid(
                    "the password must not be empty".into(),
                ));
            }
            // Everything is checked before the user is written, so a mistake leaves nothing.
            let role = parse_role(&role)?;
            let project = project.map(|p| find_project(db, &p)).transpose()?;
            let user = db.user_create(
                &name,
                &hash_password(&password)?,
                project.as_ref().map(|p| p.uuid.as_str()),
            )?;
            if let Some(project) = &project {
                db.role_assign(&user.uuid, &project.uuid, role.name())?;
            }
            Ok(users_output(db, &[user], format)?)
        }
        UserCommand::List => users_output(db, &db.users()?, format),
    }
}

pub(super) fn role(db: &Db, command: RoleCommand, format: Format) -> Result<String, ManageError> {
    match command {
        RoleCommand::Add {
            user,
            project,
            role,
        } => {
            let (user, project, role) = assignment(db, &user, &project, &role)?;
            let added = db.role_assign(&user.uuid, &project.uuid, role.name())?;
            let text = if added {
                format!(
                    "added role {role} to user {} on project {}\n",
                    user.name, project.name
                )
            } else {
                format!(
                    "user {} already has role {role} on project {}\n",
                    user.name, project.name
                )
            };
            Ok(assignment_output(
                &user, &project, role, added, text, format,
            ))
        }
        RoleCommand::Remove {
            user,
            project,
            role,
        } => {
            let (user, project, role) = assignment(db, &user, &project, &role)?;
            db.role_unassign(&user.uuid, &project.uuid, role.name())?;
            let text = format!(
                "removed role {role} from user {} on project {}\n",
                user.name, project.name
            );
            Ok(assignment_output(&user, &project, role, true, text, format))
        }
        RoleCommand::List { user } => {
            let user = find_user(db, &user)?;
            let names = project_names(db)?;
            let rows: Vec<(String, String, String)> = db
                .role_assignments(&user.uuid)?
                .into_iter()
                .map(|a| {
                    let name = names.get(&a.project_uuid).cloned().unwrap_or_default();
                    (a.project_uuid, name, a.role)
                })
                .collect();
            Ok(match format {
                Format::Json => {
                    let list: Vec<Value> = rows
                        .iter()
                        .map(|(id, name, role)| {
                            json!({
                                "project_id": id,
                                "project_name": name,
                                "role": role,
                                "role_id": Role::from_name(role).map(role_id),
                            })
                        })
                        .collect();
                    json_text(&Value::Array(list))
                }
                Format::Table => table(
                    &["PROJECT_ID", "PROJECT", "ROLE"],
                    rows.into_iter()
                        .map(|(id, name, role)| vec![id, name, role]),
                ),
            })
        }
    }
}

pub(super) fn bootstrap(
    db: &Db,
    password: Option<String>,
    format: Format,
) -> Result<String, ManageError> {
    let password = password
        .filter(|p| !p.is_empty())
        .ok_or(ManageError::NoPassword)?;
    // The same password keeps the stored hash, so repeating the bootstrap (as the all-in-one
    // does on every start) does not revoke the admin's tokens.
    let hash = match db.user_get_by_name(BOOTSTRAP_NAME)? {
        Some(admin) if verify_password(&password, &admin.password_hash) => admin.password_hash,
        _ => hash_password(&password)?,
    };
    let done = db.identity_bootstrap(&hash)?;
    let said = |yes: bool, then: &'static str, otherwise: &'static str| {
        if yes {
            then
        } else {
            otherwise
        }
    };
    let user_status = if done.user_created {
        "created"
    } else {
        said(
            done.password_changed,
            "password reset",
            "password unchanged",
        )
    };
    Ok(match format {
        Format::Json => json_text(&json!({
            "project": project_view(&done.project),
            "user": {"id": done.user.uuid, "name": done.user.name},
            "role": {"id": role_id(Role::Admin), "name": Role::Admin.name()},
            "project_created": done.project_created,
            "user_created": done.user_created,
            "password_changed": done.password_changed,
            "role_assigned": done.role_assigned,
        })),
        Format::Table => table(
            &["WHAT", "NAME", "ID", "STATUS"],
            [
                vec![
                    "project".into(),
                    done.project.name.clone(),
                    done.project.uuid.clone(),
                    said(done.project_created, "created", "exists").into(),
                ],
                vec![
                    "user".into(),
                    done.user.name.clone(),
                    done.user.uuid.clone(),
                    user_status.into(),
                ],
                vec![
                    "role".into(),
                    Role::Admin.name().into(),
                    role_id(Role::Admin),
                    format!(
                        "{} on project {}",
                        said(done.role_assigned, "assigned", "held"),
                        done.project.name
                    ),
                ],
            ],
        ),
    })
}

/// A project or user name as Keystone takes them: not empty, not too long, no control characters.
fn check_name(kind: &str, name: &str, max_len: usize) -> Result<(), ManageError> {
    let problem = if name.trim().is_empty() {
        "must not be empty"
    } else if name.chars().count() > max_len {
        "is too long"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(ManageError::Invalid(format!(
        "the {kind} name {name:?} {problem} (at most {max_len} characters)"
    )))
}

fn parse_role(name: &str) -> Result<Role, ManageError> {
    Role::from_name(name).ok_or_else(|| {
        ManageError::Invalid(format!(
            "unknown role {name:?}: the roles are admin, member and reader"
        ))
    })
}

/// A live project by id or, failing that, by name.
fn find_project(db: &Db, key: &str) -> Result<Project, ManageError> {
    match db.project_get(key)? {
        Some(project) => Ok(project),
        None => db.project_get_by_name(key)?.ok_or_else(|| {
            ManageError::Database(DbError::NotFound {
                kind: "project",
                id: key.to_string(),
            })
        }),
    }
}

/// A live user by id or, failing that, by name.
fn find_user(db: &Db, key: &str) -> Result<User, ManageError> {
    match db.user_get(key)? {
        Some(user) => Ok(user),
        None => db.user_get_by_name(key)?.ok_or_else(|| {
            ManageError::Database(DbError::NotFound {
                kind: "user",
                id: key.to_string(),
            })
        }),
    }
}

fn assignment(
    db: &Db,
    user: &str,
    project: &str,
    role: &str,
) -> Result<(User, Project, Role), ManageError> {
    let role = parse_role(role)?;
    Ok((find_user(db, user)?, find_project(db, project)?, role))
}

fn project_names(db: &Db) -> Result<HashMap<String, String>, ManageError> {
    Ok(db
        .projects()?
        .into_iter()
        .map(|p| (p.uuid, p.name))
        .collect())
}

fn project_view(project: &Project) -> Value {
    json!({
        "id": project.uuid,
        "name": project.name,
        "domain_id": project.domain_id,
        "description": project.description,
        "enabled": project.enabled,
        "created_at": project.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    })
}

fn projects_output(projects: &[Project], format: Format) -> String {
    match format {
        Format::Json => json_text(&Value::Array(projects.iter().map(project_view).collect())),
        Format::Table => table(
            &["ID", "NAME", "DOMAIN", "ENABLED", "DESCRIPTION"],
            projects.iter().map(|p| {
                vec![
                    p.uuid.clone(),
                    p.name.clone(),
                    p.domain_id.clone(),
                    p.enabled.to_string(),
                    p.description.clone(),
                ]
            }),
        ),
    }
}

fn users_output(db: &Db, users: &[User], format: Format) -> Result<String, ManageError> {
    let names = project_names(db)?;
    let default_project = |user: &User| {
        user.default_project_uuid
            .as_ref()
            .and_then(|uuid| names.get(uuid))
            .cloned()
    };
    Ok(match format {
        Format::Json => json_text(&Value::Array(
            users
                .iter()
                .map(|u| {
                    json!({
                        "id": u.uuid,
                        "name": u.name,
                        "domain_id": u.domain_id,
                        "default_project_id": u.default_project_uuid,
                        "default_project_name": default_project(u),
                        "enabled": u.enabled,
                        "created_at": u.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    })
                })
                .collect(),
        )),
        Format::Table => table(
            &["ID", "NAME", "DOMAIN", "DEFAULT_PROJECT", "ENABLED"],
            users.iter().map(|u| {
                vec![
                    u.uuid.clone(),
                    u.name.clone(),
                    u.domain_id.clone(),
                    default_project(u).unwrap_or_default(),
                    u.enabled.to_string(),
                ]
            }),
        ),
    })
}

fn assignment_output(
    user: &User,
    project: &Project,
    role: Role,
    changed: bool,
    text: String,
    format: Format,
) -> String {
    match format {
        Format::Json => json_text(&json!({
            "user_id": user.uuid,
            "user_name": user.name,
            "project_id": project.uuid,
            "project_name": project.name,
            "role": role.name(),
            "role_id": role_id(role),
            "changed": changed,
        })),
        Format::Table => text,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{json, manage, open_temp, parse};
    use super::*;

    #[test]
    fn names_must_be_sensible() {
        assert!(check_name("project", "demo", 64).is_ok());
        assert!(check_name("project", "démo ünïcode", 64).is_ok());
        for bad in ["", "  ", "a\nb", &"x".repeat(65)] {
            assert!(check_name("project", bad, 64).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bootstrap_is_repeatable_and_keeps_the_hash_for_the_same_password() {
        let (_dir, db) = open_temp();
        let first = json(&db, "bootstrap --password s3cret");
        assert_eq!(first["project_created"], true);
        assert_eq!(first["user_created"], true);
        assert_eq!(first["role_assigned"], true);
        let hash = db.user_get_by_name("admin").unwrap().unwrap().password_hash;
        assert!(verify_password("s3cret", &hash));

        let again = json(&db, "bootstrap --password s3cret");
        assert_eq!(again["user"]["id"], first["user"]["id"]);
        assert_eq!(again["project"]["id"], first["project"]["id"]);
        for flag in [
            "project_created",
            "user_created",
            "role_assigned",
            "password_changed",
        ] {
            assert_eq!(again[flag], false, "{flag}");
        }
        assert_eq!(
            db.user_get_by_name("admin").unwrap().unwrap().password_hash,
            hash
        );

        let text = manage(&db, "bootstrap --password n3w").unwrap();
        assert!(text.contains("password reset"), "{text}");
        let hash = db.user_get_by_name("admin").unwrap().unwrap().password_hash;
        assert!(verify_password("n3w", &hash) && !verify_password("s3cret", &hash));
        assert!(!text.contains("n3w"), "{text}");
    }

    #[test]
    fn bootstrap_needs_a_password() {
        let (_dir, db) = open_temp();
        for password in [None, Some(String::new())] {
            let err = bootstrap(&db, password, Format::Table).unwrap_err();
            assert!(matches!(err, ManageError::NoPassword), "{err}");
        }
        assert!(db.users().unwrap().is_empty());
    }

    #[test]
    fn projects_are_created_and_listed() {
        let (_dir, db) = open_temp();
        let text = manage(&db, "project create demo --description first").unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("ID "), "{text}");
        assert!(
            lines[1].contains("demo") && lines[1].ends_with("first"),
            "{text}"
        );
        manage(&db, "project create alpha").unwrap();

        let list = json(&db, "project list");
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["alpha", "demo"]);
        assert_eq!(list[1]["description"], "first");
        assert_eq!(list[1]["id"].as_str().unwrap().len(), 32);

        let err = manage(&db, "project create demo").unwrap_err();
        assert_eq!(err.to_string(), "project demo already exists");
    }

    #[test]
    fn a_user_gets_its_project_and_role() {
        let (_dir, db) = open_temp();
        manage(&db, "project create demo").unwrap();
        let created = json(&db, "user create alice --password pw --project demo");
        assert_eq!(created[0]["name"], "alice");
        assert_eq!(created[0]["default_project_name"], "demo");
        let alice = db.user_get_by_name("alice").unwrap().unwrap();
        let demo = db.project_get_by_name("demo").unwrap().unwrap();
        assert_eq!(
            db.roles_of(&alice.uuid, &demo.uuid).unwrap(),
            [Role::Member, Role::Reader]
        );
        assert!(verify_password("pw", &alice.password_hash));

        manage(
            &db,
            "user create olga --password pw --project demo --role admin",
        )
        .unwrap();
        let olga = db.user_get_by_name("olga").unwrap().unwrap();
        assert_eq!(db.roles_of(&olga.uuid, &demo.uuid).unwrap()[0], Role::Admin);

        manage(&db, "user create loner --password pw").unwrap();
        let text = manage(&db, "user list").unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(!text.contains("argon2"), "{text}");
        let list = json(&db, "user list");
        assert_eq!(list[1]["default_project_id"], Value::Null);
    }

    #[test]
    fn a_failed_user_create_leaves_nothing() {
        let (_dir, db) = open_temp();
        manage(&db, "project create demo").unwrap();
        let err = manage(&db, "user create alice --password pw --project nowhere").unwrap_err();
        assert_eq!(err.to_string(), "project nowhere could not be found");
        let err = manage(
            &db,
            "user create alice --password pw --project demo --role owner",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown role"), "{err}");
        assert!(db.users().unwrap().is_empty());

        manage(&db, "user create alice --password pw").unwrap();
        let err = manage(&db, "user create alice --password other").unwrap_err();
        assert_eq!(err.to_string(), "user alice already exists");
    }

    #[test]
    fn a_role_without_a_project_is_a_usage_error() {
        let err = parse("user create a --password p --role admin").unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn roles_are_added_listed_and_removed_by_name_or_id() {
        let (_dir, db) = open_temp();
        manage(&db, "project create demo").unwrap();
        manage(&db, "project create ops").unwrap();
        manage(&db, "user create alice --password pw").unwrap();
        let ops = db.project_get_by_name("ops").unwrap().unwrap();

        let text = manage(&db, "role add --user alice --project demo reader").unwrap();
        assert_eq!(text, "added role reader to user alice on project demo\n");
        let text = manage(&db, "role add --user alice --project demo reader").unwrap();
        assert_eq!(text, "user alice already has role reader on project demo\n");
        let added = json(
            &db,
            &format!("role add --user alice --project {} admin", ops.uuid),
        );
        assert_eq!(added["changed"], true);
        assert_eq!(added["project_name"], "ops");
        assert_eq!(added["role_id"], role_id(Role::Admin));

        let list = json(&db, "role list --user alice");
        let mut listed: Vec<(String, String)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["project_name"].as_str().unwrap().to_string(),
                    a["role"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                ("demo".to_string(), "reader".to_string()),
                ("ops".into(), "admin".into())
            ]
        );

        let text = manage(&db, "role remove --user alice --project demo reader").unwrap();
        assert_eq!(
            text,
            "removed role reader from user alice on project demo\n"
        );
        let err = manage(&db, "role remove --user alice --project demo reader").unwrap_err();
        assert!(
            matches!(err, ManageError::Database(DbError::NotFound { .. })),
            "{err}"
        );
        let err = manage(&db, "role add --user alice --project demo superuser").unwrap_err();
        assert!(err.to_string().contains("unknown role"), "{err}");
        let err = manage(&db, "role add --user nobody --project demo reader").unwrap_err();
        assert_eq!(err.to_string(), "user nobody could not be found");
        let text = manage(&db, "role list --user alice").unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }
}
