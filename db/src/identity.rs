//! Identity: projects, users, role assignments and tokens, the Keystone v3 subset the compute API
//! serves. Secrets never reach this module: passwords arrive as PHC hash strings and tokens as the
//! hex SHA-256 of their text, both made by the API.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::Serialize;

use crate::schema::{projects, role_assignments, tokens, users};
use crate::{now, Db, DbError, Result};
use crate::{AnyConnection, DbBackend};

/// The one domain Zova has: Keystone's default domain.
pub const DEFAULT_DOMAIN_ID: &str = "default";
/// The name Keystone gives the default domain.
pub const DEFAULT_DOMAIN_NAME: &str = "Default";
/// The project and the user that `identity_bootstrap` makes (Keystone's bootstrap defaults).
pub const BOOTSTRAP_NAME: &str = "admin";

/// The fixed set of roles, strongest first (the derived order is that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
    Reader,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Member, Role::Reader];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Reader => "reader",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }

    /// The role this one implies directly: Keystone's default rules admin ⇒ member ⇒ reader.
    pub fn implied(self) -> Option<Role> {
        match self {
            Role::Admin => Some(Role::Member),
            Role::Member => Some(Role::Reader),
            Role::Reader => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The roles that the `assigned` ones grant, implied roles included: each once, strongest first.
pub fn effective_roles(assigned: impl IntoIterator<Item = Role>) -> Vec<Role> {
    let mut effective = Vec::new();
    for role in assigned {
        let mut next = Some(role);
        while let Some(role) = next {
            if !effective.contains(&role) {
                effective.push(role);
            }
            next = role.implied();
        }
    }
    effective.sort();
    effective
}

fn unknown_role(name: &str) -> DbError {
    DbError::NotFound {
        kind: "role",
        id: format!("{name} (the roles are admin, member and reader)"),
    }
}

/// A project: what owns instances, and what a token is scoped to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = projects, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct Project {
    pub id: i64,
    /// Keystone's id: 32 lowercase hex digits.
    pub uuid: String,
    pub name: String,
    pub domain_id: String,
    pub description: String,
    pub enabled: bool,
    pub created_at: NaiveDateTime,
    pub deleted: i64,
}

/// A user who signs in with a password.
#[derive(Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = users, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct User {
    pub id: i64,
    /// Keystone's id: 32 lowercase hex digits.
    pub uuid: String,
    pub name: String,
    pub domain_id: String,
    /// An Argon2 PHC string; never serialized or printed.
    #[serde(skip)]
    pub password_hash: String,
    /// The project a token is scoped to when the request names none.
    pub default_project_uuid: Option<String>,
    pub enabled: bool,
    pub created_at: NaiveDateTime,
    pub deleted: i64,
}

// By hand, so that a logged user never carries the password hash.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("uuid", &self.uuid)
            .field("name", &self.name)
            .field("domain_id", &self.domain_id)
            .field("password_hash", &"<redacted>")
            .field("default_project_uuid", &self.default_project_uuid)
            .field("enabled", &self.enabled)
            .field("created_at", &self.created_at)
            .field("deleted", &self.deleted)
            .finish()
    }
}

/// A role a user holds on a project (as assigned, without the implied ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = role_assignments, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct RoleAssignment {
    pub id: i64,
    pub user_uuid: String,
    pub project_uuid: String,
    pub role: String,
    pub created_at: NaiveDateTime,
}

/// An issued token, known by the hex SHA-256 of its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = tokens, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct Token {
    pub id: i64,
    pub token_hash: String,
    pub user_uuid: String,
    /// None for an unscoped token.
    pub project_uuid: Option<String>,
    pub issued_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
    pub revoked_at: Option<NaiveDateTime>,
}

/// A token that is good now, with what it speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveToken {
    pub token: Token,
    pub user: User,
    /// The project of a scoped token; None for an unscoped one.
    pub project: Option<Project>,
    /// The user's effective roles on `project` as they are now (empty when unscoped).
    pub roles: Vec<Role>,
}

/// What `identity_bootstrap` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub project: Project,
    pub user: User,
    pub project_created: bool,
    pub user_created: bool,
    /// The admin user existed and its password hash was replaced (its tokens were revoked).
    pub password_changed: bool,
    /// The admin role on the admin project was not held before.
    pub role_assigned: bool,
}

fn live_project(conn: &mut AnyConnection, uuid: &str) -> Result<Option<Project>> {
    Ok(projects::table
        .filter(projects::deleted.eq(0))
        .filter(projects::uuid.eq(uuid))
        .select(Project::as_select())
        .first(conn)
        .optional()?)
}

fn live_project_by_name(conn: &mut AnyConnection, name: &str) -> Result<Option<Project>> {
    Ok(projects::table
        .filter(projects::deleted.eq(0))
        .filter(projects::domain_id.eq(DEFAULT_DOMAIN_ID))
        .filter(projects::name.eq(name))
        .select(Project::as_select())
        .first(conn)
        .optional()?)
}

fn live_user(conn: &mut AnyConnection, uuid: &str) -> Result<Option<User>> {
    Ok(users::table
        .filter(users::deleted.eq(0))
        .filter(users::uuid.eq(uuid))
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

fn live_user_by_name(conn: &mut AnyConnection, name: &str) -> Result<Option<User>> {
    Ok(users::table
        .filter(users::deleted.eq(0))
        .filter(users::domain_id.eq(DEFAULT_DOMAIN_ID))
        .filter(users::name.eq(name))
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

/// A fresh Keystone-style id.
fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn insert_project(conn: &mut AnyConnection, name: &str, description: &str) -> Result<Project> {
    if live_project_by_name(conn, name)?.is_some() {
        return Err(DbError::Duplicate {
            kind: "project",
            name: name.to_string(),
        });
    }
    Ok(diesel::insert_into(projects::table)
        .values((
            projects::uuid.eq(new_id()),
            projects::name.eq(name),
            projects::domain_id.eq(DEFAULT_DOMAIN_ID),
            projects::description.eq(description),
            projects::enabled.eq(true),
            projects::created_at.eq(now()),
        ))
        .returning(<Project as Selectable<DbBackend>>::construct_selection())
        .get_result(conn)?)
}

fn insert_user(
    conn: &mut AnyConnection,
    name: &str,
    password_hash: &str,
    default_project_uuid: Option<&str>,
) -> Result<User> {
    if live_user_by_name(conn, name)?.is_some() {
        return Err(DbError::Duplicate {
            kind: "user",
            name: name.to_string(),
        });
    }
    if let Some(project) = default_project_uuid {
        require_project(conn, project)?;
    }
    Ok(diesel::insert_into(users::table)
        .values((
            users::uuid.eq(new_id()),
            users::name.eq(name),
            users::domain_id.eq(DEFAULT_DOMAIN_ID),
            users::password_hash.eq(password_hash),
            users::default_project_uuid.eq(default_project_uuid),
            users::enabled.eq(true),
            users::created_at.eq(now()),
        ))
        .returning(<User as Selectable<DbBackend>>::construct_selection())
        .get_result(conn)?)
}

fn require_project(conn: &mut AnyConnection, uuid: &str) -> Result<Project> {
    live_project(conn, uuid)?.ok_or_else(|| DbError::NotFound {
        kind: "project",
        id: uuid.to_string(),
    })
}

fn require_user(conn: &mut AnyConnection, uuid: &str) -> Result<User> {
    live_user(conn, uuid)?.ok_or_else(|| DbError::NotFound {
        kind: "user",
        id: uuid.to_string(),
    })
}

/// Assigns `role`; true if the user did not hold it already.
fn assign(
    conn: &mut AnyConnection,
    user_uuid: &str,
    project_uuid: &str,
    role: Role,
) -> Result<bool> {
    require_user(conn, user_uuid)?;
    require_project(conn, project_uuid)?;
    // Looked up, not ON CONFLICT: the callers hold a write transaction, and the query stays one
    // that both databases take.
    let held: i64 = role_assignments::table
        .filter(role_assignments::user_uuid.eq(user_uuid))
        .filter(role_assignments::project_uuid.eq(project_uuid))
        .filter(role_assignments::role.eq(role.name()))
        .count()
        .get_result(conn)?;
    if held > 0 {
        return Ok(false);
    }
    diesel::insert_into(role_assignments::table)
        .values((
            role_assignments::user_uuid.eq(user_uuid),
            role_assignments::project_uuid.eq(project_uuid),
            role_assignments::role.eq(role.name()),
            role_assignments::created_at.eq(now()),
        ))
        .execute(conn)?;
    Ok(true)
}

fn effective_roles_on(
    conn: &mut AnyConnection,
    user_uuid: &str,
    project_uuid: &str,
) -> Result<Vec<Role>> {
    let assigned: Vec<String> = role_assignments::table
        .filter(role_assignments::user_uuid.eq(user_uuid))
        .filter(role_assignments::project_uuid.eq(project_uuid))
        .select(role_assignments::role)
        .load(conn)?;
    // The CHECK constraint keeps other names out; one that got in anyway grants nothing.
    Ok(effective_roles(
        assigned.iter().filter_map(|name| Role::from_name(name)),
    ))
}

/// Replaces the password hash; if it changed, the user's tokens stop working, as in Keystone.
/// True if it changed.
fn set_password_hash(conn: &mut AnyConnection, user: &User, password_hash: &str) -> Result<bool> {
    if user.password_hash == password_hash {
        return Ok(false);
    }
    diesel::update(users::table.find(user.id))
        .set(users::password_hash.eq(password_hash))
        .execute(conn)?;
    diesel::update(
        tokens::table
            .filter(tokens::user_uuid.eq(&user.uuid))
            .filter(tokens::revoked_at.is_null()),
    )
    .set(tokens::revoked_at.eq(now()))
    .execute(conn)?;
    Ok(true)
}

impl Db {
    /// Creates a project in the default domain; its name must not be taken by a live project.
    pub fn project_create(&self, name: &str, description: &str) -> Result<Project> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| insert_project(conn, name, description))
    }

    /// The live project with this id.
    pub fn project_get(&self, uuid: &str) -> Result<Option<Project>> {
        live_project(&mut *self.conn()?, uuid)
    }

    /// The live project with this name in the default domain.
    pub fn project_get_by_name(&self, name: &str) -> Result<Option<Project>> {
        live_project_by_name(&mut *self.conn()?, name)
    }

    /// The live projects, by name.
    pub fn projects(&self) -> Result<Vec<Project>> {
        let mut conn = self.conn()?;
        Ok(projects::table
            .filter(projects::deleted.eq(0))
            .order((projects::name.asc(), projects::id.asc()))
            .select(Project::as_select())
            .load(&mut conn)?)
    }

    /// Creates a user in the default domain; its name must not be taken by a live user and its
    /// default project, if any, must be live.
    pub fn user_create(
        &self,
        name: &str,
        password_hash: &str,
        default_project_uuid: Option<&str>,
    ) -> Result<User> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| insert_user(conn, name, password_hash, default_project_uuid))
    }

    /// The live user with this id.
    pub fn user_get(&self, uuid: &str) -> Result<Option<User>> {
        live_user(&mut *self.conn()?, uuid)
    }

    /// The live user with this name in the default domain.
    pub fn user_get_by_name(&self, name: &str) -> Result<Option<User>> {
        live_user_by_name(&mut *self.conn()?, name)
    }

    /// The live users, by name.
    pub fn users(&self) -> Result<Vec<User>> {
        let mut conn = self.conn()?;
        Ok(users::table
            .filter(users::deleted.eq(0))
            .order((users::name.asc(), users::id.asc()))
            .select(User::as_select())
            .load(&mut conn)?)
    }

    /// Replaces a user's password hash. A new password revokes the user's tokens (as Keystone
    /// does), so a reset after a leak locks the old sessions out. True if the hash changed.
    pub fn user_set_password_hash(&self, user_uuid: &str, password_hash: &str) -> Result<bool> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let user = require_user(conn, user_uuid)?;
            set_password_hash(conn, &user, password_hash)
        })
    }

    /// Gives a user `role` (admin, member or reader) on a project. Assigning a role the user
    /// already holds changes nothing; true if the assignment is new.
    pub fn role_assign(&self, user_uuid: &str, project_uuid: &str, role: &str) -> Result<bool> {
        let role = Role::from_name(role).ok_or_else(|| unknown_role(role))?;
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| assign(conn, user_uuid, project_uuid, role))
    }

    /// Takes `role` away from a user on a project; the user must hold it (as assigned, not
    /// implied).
    pub fn role_unassign(&self, user_uuid: &str, project_uuid: &str, role: &str) -> Result<()> {
        let role = Role::from_name(role).ok_or_else(|| unknown_role(role))?;
        let mut conn = self.writer()?;
        let removed = diesel::delete(
            role_assignments::table
                .filter(role_assignments::user_uuid.eq(user_uuid))
                .filter(role_assignments::project_uuid.eq(project_uuid))
                .filter(role_assignments::role.eq(role.name())),
        )
        .execute(&mut *conn)?;
        if removed == 0 {
            return Err(DbError::NotFound {
                kind: "role assignment",
                id: format!("{role} of user {user_uuid} on project {project_uuid}"),
            });
        }
        Ok(())
    }

    /// The user's effective roles on a project: the assigned ones and those they imply,
    /// strongest first. Empty if the user has no access.
    pub fn roles_of(&self, user_uuid: &str, project_uuid: &str) -> Result<Vec<Role>> {
        effective_roles_on(&mut *self.conn()?, user_uuid, project_uuid)
    }

    /// The roles assigned to a user (without the implied ones), by project then role.
    pub fn role_assignments(&self, user_uuid: &str) -> Result<Vec<RoleAssignment>> {
        let mut conn = self.conn()?;
        Ok(role_assignments::table
            .filter(role_assignments::user_uuid.eq(user_uuid))
            .order((
                role_assignments::project_uuid.asc(),
                role_assignments::role.asc(),
            ))
            .select(RoleAssignment::as_select())
            .load(&mut conn)?)
    }

    /// Records an issued token by its hash. Tokens that expired by `issued_at` are deleted on
    /// the way, so the table holds only tokens that could still be presented.
    pub fn token_insert(
        &self,
        token_hash: &str,
        user_uuid: &str,
        project_uuid: Option<&str>,
        issued_at: NaiveDateTime,
        expires_at: NaiveDateTime,
    ) -> Result<Token> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            diesel::delete(tokens::table.filter(tokens::expires_at.le(issued_at))).execute(conn)?;
            Ok(diesel::insert_into(tokens::table)
                .values((
                    tokens::token_hash.eq(token_hash),
                    tokens::user_uuid.eq(user_uuid),
                    tokens::project_uuid.eq(project_uuid),
                    tokens::issued_at.eq(issued_at),
                    tokens::expires_at.eq(expires_at),
                ))
                .returning(<Token as Selectable<DbBackend>>::construct_selection())
                .get_result(conn)?)
        })
    }

    /// The token with this hash if it is good at `now`: not revoked, not expired, its user live
    /// and enabled and, for a scoped token, its project live and enabled and the user still
    /// holding a role there (roles are read now, as Keystone does, not frozen at issue).
    pub fn token_lookup(&self, token_hash: &str, now: NaiveDateTime) -> Result<Option<LiveToken>> {
        let mut conn = self.conn()?;
        conn.transaction(|conn| {
            let token: Option<Token> = tokens::table
                .filter(tokens::token_hash.eq(token_hash))
                .filter(tokens::revoked_at.is_null())
                .filter(tokens::expires_at.gt(now))
                .select(Token::as_select())
                .first(conn)
                .optional()?;
            let Some(token) = token else {
                return Ok(None);
            };
            let user = match live_user(conn, &token.user_uuid)? {
                Some(user) if user.enabled => user,
                _ => return Ok(None),
            };
            let Some(project_uuid) = token.project_uuid.as_deref() else {
                return Ok(Some(LiveToken {
                    token,
                    user,
                    project: None,
                    roles: Vec::new(),
                }));
            };
            let project = match live_project(conn, project_uuid)? {
                Some(project) if project.enabled => project,
                _ => return Ok(None),
            };
            let roles = effective_roles_on(conn, &user.uuid, &project.uuid)?;
            if roles.is_empty() {
                return Ok(None);
            }
            Ok(Some(LiveToken {
                token,
                user,
                project: Some(project),
                roles,
            }))
        })
    }

    /// Revokes the token with this hash; true if it was live (unrevoked and unexpired).
    pub fn token_revoke(&self, token_hash: &str) -> Result<bool> {
        let mut conn = self.writer()?;
        let at = now();
        let revoked = diesel::update(
            tokens::table
                .filter(tokens::token_hash.eq(token_hash))
                .filter(tokens::revoked_at.is_null())
                .filter(tokens::expires_at.gt(at)),
        )
        .set(tokens::revoked_at.eq(at))
        .execute(&mut *conn)?;
        Ok(revoked == 1)
    }

    /// Keystone's bootstrap, safe to repeat: project `admin`, user `admin` (enabled, with this
    /// password hash and, if it has none, `admin` as its default project) and the role `admin`
    /// on project `admin`. A changed hash revokes the admin's tokens.
    pub fn identity_bootstrap(&self, admin_password_hash: &str) -> Result<Bootstrap> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let (project, project_created) = match live_project_by_name(conn, BOOTSTRAP_NAME)? {
                Some(project) if project.enabled => (project, false),
                Some(project) => {
                    let project = diesel::update(projects::table.find(project.id))
                        .set(projects::enabled.eq(true))
                        .returning(<Project as Selectable<DbBackend>>::construct_selection())
                        .get_result(conn)?;
                    (project, false)
                }
                None => (
                    insert_project(conn, BOOTSTRAP_NAME, "Bootstrap project for the admin")?,
                    true,
                ),
            };
            let (user, user_created, password_changed) =
                match live_user_by_name(conn, BOOTSTRAP_NAME)? {
                    Some(user) => {
                        let password_changed = set_password_hash(conn, &user, admin_password_hash)?;
                        let default_project = user
                            .default_project_uuid
                            .clone()
                            .unwrap_or_else(|| project.uuid.clone());
                        let user = diesel::update(users::table.find(user.id))
                            .set((
                                users::enabled.eq(true),
                                users::default_project_uuid.eq(default_project),
                            ))
                            .returning(<User as Selectable<DbBackend>>::construct_selection())
                            .get_result(conn)?;
                        (user, false, password_changed)
                    }
                    None => (
                        insert_user(
                            conn,
                            BOOTSTRAP_NAME,
                            admin_password_hash,
                            Some(&project.uuid),
                        )?,
                        true,
                        false,
                    ),
                };
            let role_assigned = assign(conn, &user.uuid, &project.uuid, Role::Admin)?;
            Ok(Bootstrap {
                project,
                user,
                project_created,
                user_created,
                password_changed,
                role_assigned,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, NaiveDateTime};
    use diesel::prelude::*;

    use super::*;
    use crate::testing::open_temp;

    fn at(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    /// A user `name` with the given roles on a fresh project `project`.
    fn user_on_project(db: &Db, name: &str, project: &str, roles: &[&str]) -> (User, Project) {
        let project = db.project_create(project, "").unwrap();
        let user = db
            .user_create(name, &format!("hash-of-{name}"), Some(&project.uuid))
            .unwrap();
        for role in roles {
            db.role_assign(&user.uuid, &project.uuid, role).unwrap();
        }
        (user, project)
    }

    #[test]
    fn roles_imply_the_weaker_ones() {
        use Role::*;
        let cases: [(&[Role], &[Role]); 6] = [
            (&[], &[]),
            (&[Reader], &[Reader]),
            (&[Member], &[Member, Reader]),
            (&[Admin], &[Admin, Member, Reader]),
            (&[Reader, Admin], &[Admin, Member, Reader]),
            (&[Member, Member, Reader], &[Member, Reader]),
        ];
        for (assigned, effective) in cases {
            assert_eq!(
                effective_roles(assigned.iter().copied()),
                effective,
                "{assigned:?}"
            );
        }
        for role in Role::ALL {
            assert_eq!(Role::from_name(role.name()), Some(role));
        }
        assert_eq!(Role::from_name("Admin"), None);
        assert_eq!(Role::from_name("superuser"), None);
    }

    #[test]
    fn projects_have_keystone_ids_and_unique_names() {
        let (_dir, db) = open_temp();
        let demo = db.project_create("demo", "the demo project").unwrap();
        assert_eq!(demo.uuid.len(), 32);
        assert!(demo
            .uuid
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(
            (demo.domain_id.as_str(), demo.description.as_str()),
            ("default", "the demo project")
        );
        assert!(demo.enabled);

        let err = db.project_create("demo", "again").unwrap_err();
        assert!(
            matches!(err, DbError::Duplicate { kind: "project", ref name } if name == "demo"),
            "{err}"
        );
        assert_eq!(err.to_string(), "project demo already exists");

        let alpha = db.project_create("alpha", "").unwrap();
        assert_eq!(db.project_get(&demo.uuid).unwrap(), Some(demo.clone()));
        assert_eq!(
            db.project_get_by_name("alpha").unwrap(),
            Some(alpha.clone())
        );
        assert_eq!(db.project_get("nope").unwrap(), None);
        assert_eq!(db.project_get_by_name("nope").unwrap(), None);
        assert_eq!(db.projects().unwrap(), vec![alpha, demo]);
    }

    #[test]
    fn a_deleted_projects_name_can_be_reused() {
        let (_dir, db) = open_temp();
        let old = db.project_create("demo", "").unwrap();
        let mut conn = db.conn().unwrap();
        diesel::update(projects::table.find(old.id))
            .set(projects::deleted.eq(old.id))
            .execute(&mut conn)
            .unwrap();
        let new = db.project_create("demo", "").unwrap();
        assert_ne!(new.uuid, old.uuid);
        assert_eq!(db.project_get(&old.uuid).unwrap(), None);
        assert_eq!(db.projects().unwrap(), vec![new]);
    }

    #[test]
    fn users_have_unique_names_and_a_live_default_project() {
        let (_dir, db) = open_temp();
        let demo = db.project_create("demo", "").unwrap();
        let alice = db
            .user_create("alice", "$argon2id$alice", Some(&demo.uuid))
            .unwrap();
        assert_eq!(alice.uuid.len(), 32);
        assert_eq!(
            alice.default_project_uuid.as_deref(),
            Some(demo.uuid.as_str())
        );
        assert_eq!(alice.password_hash, "$argon2id$alice");
        let bob = db.user_create("bob", "$argon2id$bob", None).unwrap();
        assert_eq!(bob.default_project_uuid, None);

        let err = db.user_create("alice", "x", None).unwrap_err();
        assert_eq!(err.to_string(), "user alice already exists");
        let err = db.user_create("carol", "x", Some("0123")).unwrap_err();
        assert!(
            matches!(
                err,
                DbError::NotFound {
                    kind: "project",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(db.user_get_by_name("carol").unwrap(), None);

        assert_eq!(db.user_get(&alice.uuid).unwrap(), Some(alice.clone()));
        assert_eq!(db.user_get_by_name("bob").unwrap(), Some(bob.clone()));
        assert_eq!(db.user_get("nope").unwrap(), None);
        assert_eq!(db.users().unwrap(), vec![alice, bob]);
    }

    #[test]
    fn a_users_debug_form_hides_the_password_hash() {
        let (_dir, db) = open_temp();
        let alice = db.user_create("alice", "$argon2id$secret", None).unwrap();
        let shown = format!("{alice:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
    }

    #[test]
    fn role_assignments_are_validated_idempotent_and_imply_roles() {
        let (_dir, db) = open_temp();
        let (alice, demo) = user_on_project(&db, "alice", "demo", &[]);
        assert_eq!(db.roles_of(&alice.uuid, &demo.uuid).unwrap(), []);

        assert!(db.role_assign(&alice.uuid, &demo.uuid, "member").unwrap());
        assert!(!db.role_assign(&alice.uuid, &demo.uuid, "member").unwrap());
        assert_eq!(
            db.roles_of(&alice.uuid, &demo.uuid).unwrap(),
            [Role::Member, Role::Reader]
        );
        assert!(db.role_assign(&alice.uuid, &demo.uuid, "admin").unwrap());
        assert_eq!(
            db.roles_of(&alice.uuid, &demo.uuid).unwrap(),
            [Role::Admin, Role::Member, Role::Reader]
        );

        let err = db
            .role_assign(&alice.uuid, &demo.uuid, "superuser")
            .unwrap_err();
        assert!(
            matches!(err, DbError::NotFound { kind: "role", .. }),
            "{err}"
        );
        let err = db.role_assign("nobody", &demo.uuid, "member").unwrap_err();
        assert!(
            matches!(err, DbError::NotFound { kind: "user", .. }),
            "{err}"
        );
        let err = db
            .role_assign(&alice.uuid, "nowhere", "member")
            .unwrap_err();
        assert!(
            matches!(
                err,
                DbError::NotFound {
                    kind: "project",
                    ..
                }
            ),
            "{err}"
        );

        let assigned: Vec<String> = db
            .role_assignments(&alice.uuid)
            .unwrap()
            .into_iter()
            .map(|a| a.role)
            .collect();
        assert_eq!(assigned, ["admin", "member"]);

        db.role_unassign(&alice.uuid, &demo.uuid, "admin").unwrap();
        assert_eq!(
            db.roles_of(&alice.uuid, &demo.uuid).unwrap(),
            [Role::Member, Role::Reader]
        );
        // Reader is implied by member, not assigned: there is nothing to take away.
        let err = db
            .role_unassign(&alice.uuid, &demo.uuid, "reader")
            .unwrap_err();
        assert!(
            matches!(
                err,
                DbError::NotFound {
                    kind: "role assignment",
                    ..
                }
            ),
            "{err}"
        );
        let err = db
            .role_unassign(&alice.uuid, &demo.uuid, "owner")
            .unwrap_err();
        assert!(
            matches!(err, DbError::NotFound { kind: "role", .. }),
            "{err}"
        );
    }

    #[test]
    fn roles_are_per_project() {
        let (_dir, db) = open_temp();
        let (alice, demo) = user_on_project(&db, "alice", "demo", &["admin"]);
        let other = db.project_create("other", "").unwrap();
        db.role_assign(&alice.uuid, &other.uuid, "reader").unwrap();
        assert_eq!(
            db.roles_of(&alice.uuid, &demo.uuid).unwrap(),
            [Role::Admin, Role::Member, Role::Reader]
        );
        assert_eq!(
            db.roles_of(&alice.uuid, &other.uuid).unwrap(),
            [Role::Reader]
        );
    }

    #[test]
    fn a_token_is_live_until_it_expires() {
        let (_dir, db) = open_temp();
        let (alice, demo) = user_on_project(&db, "alice", "demo", &["member"]);
        let issued = at("2030-01-01 10:00:00");
        let expires = issued + Duration::hours(12);
        let token = db
            .token_insert("h1", &alice.uuid, Some(&demo.uuid), issued, expires)
            .unwrap();
        assert_eq!(
            (token.issued_at, token.expires_at, token.revoked_at),
            (issued, expires, None)
        );

        let live = db
            .token_lookup("h1", issued + Duration::hours(1))
            .unwrap()
            .unwrap();
        assert_eq!(live.token, token);
        assert_eq!(live.user.uuid, alice.uuid);
        assert_eq!(live.project, Some(demo));
        assert_eq!(live.roles, [Role::Member, Role::Reader]);

        assert_eq!(db.token_lookup("h1", expires).unwrap(), None);
        assert_eq!(
            db.token_lookup("h1", expires + Duration::seconds(1))
                .unwrap(),
            None
        );
        assert_eq!(db.token_lookup("h2", issued).unwrap(), None);
    }

    #[test]
    fn an_unscoped_token_has_no_project_and_no_roles() {
        let (_dir, db) = open_temp();
        let alice = db.user_create("alice", "x", None).unwrap();
        let issued = at("2030-01-01 10:00:00");
        db.token_insert("h", &alice.uuid, None, issued, issued + Duration::hours(1))
            .unwrap();
        let live = db.token_lookup("h", issued).unwrap().unwrap();
        assert_eq!((live.project, live.roles), (None, vec![]));
    }

    #[test]
    fn inserting_a_token_deletes_the_expired_ones() {
        let (_dir, db) = open_temp();
        let alice = db.user_create("alice", "x", None).unwrap();
        let t0 = at("2030-01-01 10:00:00");
        db.token_insert("old", &alice.uuid, None, t0, t0 + Duration::hours(1))
            .unwrap();
        db.token_insert("young", &alice.uuid, None, t0, t0 + Duration::hours(3))
            .unwrap();
        db.token_insert(
            "new",
            &alice.uuid,
            None,
            t0 + Duration::hours(2),
            t0 + Duration::hours(9),
        )
        .unwrap();
        let mut conn = db.conn().unwrap();
        let left: Vec<String> = tokens::table
            .order(tokens::id.asc())
            .select(tokens::token_hash)
            .load(&mut conn)
            .unwrap();
        assert_eq!(left, ["young", "new"]);
    }

    #[test]
    fn a_revoked_token_is_not_live() {
        let (_dir, db) = open_temp();
        let alice = db.user_create("alice", "x", None).unwrap();
        let issued = crate::now();
        db.token_insert("h", &alice.uuid, None, issued, issued + Duration::hours(1))
            .unwrap();
        assert!(db.token_revoke("h").unwrap());
        assert!(!db.token_revoke("h").unwrap(), "revoked twice");
        assert!(!db.token_revoke("unknown").unwrap());
        assert_eq!(db.token_lookup("h", issued).unwrap(), None);
    }

    #[test]
    fn a_token_dies_with_its_users_access() {
        let (_dir, db) = open_temp();
        let (alice, demo) = user_on_project(&db, "alice", "demo", &["member"]);
        let (bob, _) = user_on_project(&db, "bob", "bobs", &["member"]);
        db.role_assign(&bob.uuid, &demo.uuid, "reader").unwrap();
        let issued = at("2030-01-01 10:00:00");
        let expires = issued + Duration::hours(1);
        db.token_insert("a", &alice.uuid, Some(&demo.uuid), issued, expires)
            .unwrap();
        db.token_insert("b", &bob.uuid, Some(&demo.uuid), issued, expires)
            .unwrap();

        db.role_unassign(&alice.uuid, &demo.uuid, "member").unwrap();
        assert_eq!(db.token_lookup("a", issued).unwrap(), None);

        let mut conn = db.conn().unwrap();
        diesel::update(users::table.find(bob.id))
            .set(users::enabled.eq(false))
            .execute(&mut conn)
            .unwrap();
        assert_eq!(db.token_lookup("b", issued).unwrap(), None);
    }

    #[test]
    fn a_new_password_revokes_the_users_tokens() {
        let (_dir, db) = open_temp();
        let (alice, _) = user_on_project(&db, "alice", "demo", &["member"]);
        let bob = db.user_create("bob", "x", None).unwrap();
        let issued = crate::now();
        let expires = issued + Duration::hours(1);
        db.token_insert("a", &alice.uuid, None, issued, expires)
            .unwrap();
        db.token_insert("b", &bob.uuid, None, issued, expires)
            .unwrap();

        assert!(!db
            .user_set_password_hash(&alice.uuid, &alice.password_hash)
            .unwrap());
        assert!(db.token_lookup("a", issued).unwrap().is_some());

        assert!(db.user_set_password_hash(&alice.uuid, "new-hash").unwrap());
        assert_eq!(
            db.user_get(&alice.uuid).unwrap().unwrap().password_hash,
            "new-hash"
        );
        assert_eq!(db.token_lookup("a", issued).unwrap(), None);
        assert!(db.token_lookup("b", issued).unwrap().is_some());

        let err = db.user_set_password_hash("nobody", "x").unwrap_err();
        assert!(
            matches!(err, DbError::NotFound { kind: "user", .. }),
            "{err}"
        );
    }

    #[test]
    fn bootstrap_is_idempotent_and_resets_the_password() {
        let (_dir, db) = open_temp();
        let first = db.identity_bootstrap("hash-1").unwrap();
        assert!(first.project_created && first.user_created && first.role_assigned);
        assert!(!first.password_changed);
        assert_eq!(
            (first.project.name.as_str(), first.user.name.as_str()),
            ("admin", "admin")
        );
        assert_eq!(first.user.password_hash, "hash-1");
        assert_eq!(
            first.user.default_project_uuid.as_deref(),
            Some(first.project.uuid.as_str())
        );
        assert_eq!(
            db.roles_of(&first.user.uuid, &first.project.uuid).unwrap(),
            [Role::Admin, Role::Member, Role::Reader]
        );

        let again = db.identity_bootstrap("hash-1").unwrap();
        assert_eq!((&again.project, &again.user), (&first.project, &first.user));
        assert!(
            !(again.project_created
                || again.user_created
                || again.role_assigned
                || again.password_changed)
        );

        let issued = crate::now();
        db.token_insert(
            "t",
            &first.user.uuid,
            Some(&first.project.uuid),
            issued,
            issued + Duration::hours(1),
        )
        .unwrap();
        let reset = db.identity_bootstrap("hash-2").unwrap();
        assert!(reset.password_changed);
        assert_eq!(reset.user.uuid, first.user.uuid);
        assert_eq!(reset.user.password_hash, "hash-2");
        assert_eq!(db.token_lookup("t", issued).unwrap(), None);

        assert_eq!(db.projects().unwrap().len(), 1);
        assert_eq!(db.users().unwrap().len(), 1);
        assert_eq!(db.role_assignments(&first.user.uuid).unwrap().len(), 1);
    }

    #[test]
    fn bootstrap_repairs_a_disabled_admin_without_a_role() {
        let (_dir, db) = open_temp();
        let first = db.identity_bootstrap("hash").unwrap();
        db.role_unassign(&first.user.uuid, &first.project.uuid, "admin")
            .unwrap();
        let mut conn = db.conn().unwrap();
        diesel::update(users::table.find(first.user.id))
            .set((
                users::enabled.eq(false),
                users::default_project_uuid.eq(None::<String>),
            ))
            .execute(&mut conn)
            .unwrap();
        diesel::update(projects::table.find(first.project.id))
            .set(projects::enabled.eq(false))
            .execute(&mut conn)
            .unwrap();

        let repaired = db.identity_bootstrap("hash").unwrap();
        assert!(repaired.role_assigned);
        assert!(repaired.user.enabled && repaired.project.enabled);
        assert_eq!(
            repaired.user.default_project_uuid.as_deref(),
            Some(first.project.uuid.as_str())
        );
    }

    #[test]
    fn bootstrap_keeps_an_admins_own_default_project() {
        let (_dir, db) = open_temp();
        let ops = db.project_create("ops", "").unwrap();
        db.user_create("admin", "hash", Some(&ops.uuid)).unwrap();
        let boot = db.identity_bootstrap("hash").unwrap();
        assert!(boot.project_created && !boot.user_created);
        assert_eq!(boot.user.default_project_uuid, Some(ops.uuid));
    }
}
