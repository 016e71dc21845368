//! Key pairs: public keys a user registers by name (Nova's `os-keypairs`).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::Serialize;

use crate::schema::key_pairs;
use crate::{now, Db, DbBackend, DbError, Result};

/// A user's named public key.
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = key_pairs, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct KeyPair {
    pub id: i64,
    pub name: String,
    pub user_id: String,
    pub fingerprint: String,
    pub public_key: String,
    /// `ssh` or `x509`.
    pub key_type: String,
    pub created_at: NaiveDateTime,
    pub deleted: i64,
}

/// A key pair to store; the method adds `created_at`.
#[derive(Debug, Clone, PartialEq, Insertable)]
#[diesel(table_name = key_pairs)]
pub struct NewKeyPair {
    pub name: String,
    pub user_id: String,
    pub fingerprint: String,
    pub public_key: String,
    pub key_type: String,
}

fn key_pair_not_found(user_id: &str, name: &str) -> DbError {
    DbError::NotFound {
        kind: "key pair",
        id: format!("{name} of user {user_id}"),
    }
}

impl Db {
    /// Stores a key pair; [`DbError::Conflict`] if the user already has one of that name,
    /// [`DbError::OverQuota`] if the user already has `limit` (`-1`: no limit), counted in the
    /// same transaction.
    pub fn key_pair_create(&self, new: &NewKeyPair, limit: i64) -> Result<KeyPair> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let held: i64 = key_pairs::table
                .filter(key_pairs::deleted.eq(0))
                .filter(key_pairs::user_id.eq(&new.user_id))
                .count()
                .get_result(conn)?;
            if limit >= 0 && held >= limit {
                return Err(DbError::OverQuota(format!(
                    "Quota exceeded for key_pairs: Requested 1, but already used {held} of {limit} key_pairs"
                )));
            }
            let taken: i64 = key_pairs::table
                .filter(key_pairs::deleted.eq(0))
                .filter(key_pairs::user_id.eq(&new.user_id))
                .filter(key_pairs::name.eq(&new.name))
                .count()
                .get_result(conn)?;
            if taken > 0 {
                return Err(DbError::Conflict(format!(
                    "Key pair '{}' already exists.",
                    new.name
                )));
            }
            Ok(diesel::insert_into(key_pairs::table)
                .values((new, key_pairs::created_at.eq(now())))
                .returning(<KeyPair as Selectable<DbBackend>>::construct_selection())
                .get_result(conn)?)
        })
    }

    /// A user's live key pairs, by name.
    pub fn key_pairs(&self, user_id: &str) -> Result<Vec<KeyPair>> {
        let mut conn = self.conn()?;
        Ok(key_pairs::table
            .filter(key_pairs::deleted.eq(0))
            .filter(key_pairs::user_id.eq(user_id))
            .order(key_pairs::name.asc())
            .select(KeyPair::as_select())
            .load(&mut conn)?)
    }

    /// A user's live key pair by name.
    pub fn key_pair_get(&self, user_id: &str, name: &str) -> Result<Option<KeyPair>> {
        let mut conn = self.conn()?;
        Ok(key_pairs::table
            .filter(key_pairs::deleted.eq(0))
            .filter(key_pairs::user_id.eq(user_id))
            .filter(key_pairs::name.eq(name))
            .select(KeyPair::as_select())
            .first(&mut conn)
            .optional()?)
    }

    /// Soft-deletes a user's key pair; NotFound if there is none of that name.
    pub fn key_pair_delete(&self, user_id: &str, name: &str) -> Result<()> {
        let mut conn = self.writer()?;
        let deleted = diesel::update(
            key_pairs::table
                .filter(key_pairs::deleted.eq(0))
                .filter(key_pairs::user_id.eq(user_id))
                .filter(key_pairs::name.eq(name)),
        )
        .set(key_pairs::deleted.eq(key_pairs::id))
        .execute(&mut *conn)?;
        if deleted == 0 {
            return Err(key_pair_not_found(user_id, name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::open_temp;

    fn key(name: &str, user: &str) -> NewKeyPair {
        NewKeyPair {
            name: name.into(),
            user_id: user.into(),
            fingerprint: "aa:bb".into(),
            public_key: "ssh-ed25519 AAAA test".into(),
            key_type: "ssh".into(),
        }
    }

    #[test]
    fn names_are_unique_per_user_and_reusable_after_delete() {
        let (_dir, db) = open_temp();
        db.key_pair_create(&key("k", "alice"), -1).unwrap();
        db.key_pair_create(&key("k", "bob"), -1).unwrap();
        assert!(matches!(
            db.key_pair_create(&key("k", "alice"), -1),
            Err(DbError::Conflict(_))
        ));
        assert_eq!(db.key_pairs("alice").unwrap().len(), 1);
        db.key_pair_delete("alice", "k").unwrap();
        assert!(db.key_pair_get("alice", "k").unwrap().is_none());
        assert!(matches!(
            db.key_pair_delete("alice", "k"),
            Err(DbError::NotFound { .. })
        ));
        db.key_pair_create(&key("k", "alice"), -1).unwrap();
        assert!(db.key_pair_get("bob", "k").unwrap().is_some());
        assert!(matches!(
            db.key_pair_create(&key("k2", "alice"), 1),
            Err(DbError::OverQuota(_))
        ));
    }
}
