//! Flavors and images: the catalogue a boot request picks from.

use diesel::prelude::*;

use crate::schema::{flavor_extra_specs, flavors, images};
use crate::{now, Db, DbError, Flavor, Image, Result};
use crate::{AnyConnection, DbBackend};

/// A flavor to create (`os-flavor-manage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFlavor {
    pub flavorid: String,
    pub name: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub root_gb: i64,
    pub ephemeral_gb: i64,
    pub swap_mb: i64,
    pub is_public: bool,
}

/// The row id of the live flavor with this flavorid.
pub(crate) fn flavor_row_id(conn: &mut AnyConnection, flavorid: &str) -> Result<i64> {
    direct!(conn, c => {
        flavors::table
            .filter(flavors::deleted.eq(0))
            .filter(flavors::flavorid.eq(flavorid))
            .select(flavors::id)
            .first(c)
            .optional()
    })?
    .ok_or_else(|| crate::DbError::NotFound {
        kind: "flavor",
        id: flavorid.to_string(),
    })
}

/// The live image with this uuid, on the caller's connection.
pub(crate) fn live_image(conn: &mut AnyConnection, uuid: &str) -> QueryResult<Option<Image>> {
    direct!(conn, c => {
        images::table
            .filter(images::deleted.eq(0))
            .filter(images::uuid.eq(uuid))
            .select(Image::as_select())
            .first(c)
            .optional()
    })
}

impl Db {
    /// The enabled flavors, smallest memory first (ties by flavorid).
    pub fn flavors(&self) -> Result<Vec<Flavor>> {
        let mut conn = self.conn()?;
        Ok(flavors::table
            .filter(flavors::deleted.eq(0))
            .filter(flavors::disabled.eq(false))
            .order((flavors::memory_mb.asc(), flavors::flavorid.asc()))
            .select(Flavor::as_select())
            .load(&mut conn)?)
    }

    /// The live flavor with this flavorid, disabled or not.
    pub fn flavor_get(&self, flavorid: &str) -> Result<Option<Flavor>> {
        let mut conn = self.conn()?;
        Ok(direct!(&mut *conn, c => {
            flavors::table
                .filter(flavors::deleted.eq(0))
                .filter(flavors::flavorid.eq(flavorid))
                .select(Flavor::as_select())
                .first(c)
                .optional()
        })?)
    }

    /// The live flavor with this name, disabled or not.
    pub fn flavor_get_by_name(&self, name: &str) -> Result<Option<Flavor>> {
        let mut conn = self.conn()?;
        Ok(flavors::table
            .filter(flavors::deleted.eq(0))
            .filter(flavors::name.eq(name))
            .order(flavors::id.asc())
            .select(Flavor::as_select())
            .first(&mut conn)
            .optional()?)
    }

    /// Creates a flavor; [`DbError::Conflict`] if its id or name is taken.
    pub fn flavor_create(&self, new: &NewFlavor) -> Result<Flavor> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let taken: i64 = flavors::table
                .filter(flavors::deleted.eq(0))
                .filter(
                    flavors::flavorid
                        .eq(&new.flavorid)
                        .or(flavors::name.eq(&new.name)),
                )
                .count()
                .get_result(conn)?;
            if taken > 0 {
                return Err(DbError::Conflict(format!(
                    "Flavor with ID {} or name {} already exists.",
                    new.flavorid, new.name
                )));
            }
            Ok(diesel::insert_into(flavors::table)
                .values((
                    flavors::flavorid.eq(&new.flavorid),
                    flavors::name.eq(&new.name),
                    flavors::vcpus.eq(new.vcpus),
                    flavors::memory_mb.eq(new.memory_mb),
                    flavors::root_gb.eq(new.root_gb),
                    flavors::ephemeral_gb.eq(new.ephemeral_gb),
                    flavors::swap_mb.eq(new.swap_mb),
                    flavors::is_public.eq(new.is_public),
                    flavors::disabled.eq(false),
                    flavors::created_at.eq(now()),
                ))
                .returning(<Flavor as Selectable<DbBackend>>::construct_selection())
                .get_result(conn)?)
        })
    }

    /// Deletes a flavor and its extra specs for good (as Nova's API database does), so its id
    /// can be used again; servers keep their own copy of what they were built with.
    pub fn flavor_delete(&self, flavorid: &str) -> Result<()> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let id = flavor_row_id(conn, flavorid)?;
            diesel::delete(flavor_extra_specs::table.filter(flavor_extra_specs::flavor_id.eq(id)))
                .execute(conn)?;
            diesel::delete(flavors::table.filter(flavors::id.eq(id))).execute(conn)?;
            Ok(())
        })
    }

    /// Removes one extra spec of a flavor; NotFound if the flavor or the key does not exist.
    pub fn flavor_extra_spec_delete(&self, flavorid: &str, key: &str) -> Result<()> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let id = flavor_row_id(conn, flavorid)?;
            let removed = diesel::delete(
                flavor_extra_specs::table
                    .filter(flavor_extra_specs::flavor_id.eq(id))
                    .filter(flavor_extra_specs::spec_key.eq(key)),
            )
            .execute(conn)?;
            if removed == 0 {
                return Err(DbError::NotFound {
                    kind: "flavor extra spec",
                    id: format!("{key} of flavor {flavorid}"),
                });
            }
            Ok(())
        })
    }

    /// The live images, by name.
    pub fn images(&self) -> Result<Vec<Image>> {
        let mut conn = self.conn()?;
        Ok(images::table
            .filter(images::deleted.eq(0))
            .order((images::name.asc(), images::id.asc()))
            .select(Image::as_select())
            .load(&mut conn)?)
    }

    /// The live image with this uuid.
    pub fn image_get(&self, uuid: &str) -> Result<Option<Image>> {
        let mut conn = self.conn()?;
        Ok(live_image(&mut conn, uuid)?)
    }

    /// The oldest live image with this name (names need not be unique, as in Glance).
    pub fn image_get_by_name(&self, name: &str) -> Result<Option<Image>> {
        let mut conn = self.conn()?;
        Ok(images::table
            .filter(images::deleted.eq(0))
            .filter(images::name.eq(name))
            .order(images::id.asc())
            .select(Image::as_select())
            .first(&mut conn)
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::open_temp;

    #[test]
    fn seeded_flavors_are_nova_classics_in_size_order() {
        let (_dir, db) = open_temp();
        let flavors = db.flavors().unwrap();
        let summary: Vec<(&str, &str, i64, i64, i64)> = flavors
            .iter()
            .map(|f| {
                (
                    f.flavorid.as_str(),
                    f.name.as_str(),
                    f.vcpus,
                    f.memory_mb,
                    f.root_gb,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("1", "m1.tiny", 1, 512, 1),
                ("2", "m1.small", 1, 2048, 20),
                ("3", "m1.medium", 2, 4096, 40),
                ("4", "m1.large", 4, 8192, 80),
                ("5", "m1.xlarge", 8, 16384, 160),
            ]
        );
        assert!(flavors
            .iter()
            .all(|f| f.ephemeral_gb == 0 && f.swap_mb == 0 && f.is_public && !f.disabled));
    }

    #[test]
    fn flavor_lookup_by_id_and_name() {
        let (_dir, db) = open_temp();
        assert_eq!(db.flavor_get("2").unwrap().unwrap().name, "m1.small");
        assert_eq!(
            db.flavor_get_by_name("m1.large").unwrap().unwrap().flavorid,
            "4"
        );
        assert!(db.flavor_get("42").unwrap().is_none());
        assert!(db.flavor_get_by_name("m1.huge").unwrap().is_none());
    }

    #[test]
    fn image_lookup_by_uuid_and_name() {
        let (_dir, db) = open_temp();
        let image = db
            .image_get("155d900f-4e14-4e4c-a73d-069cbf4541e6")
            .unwrap()
            .unwrap();
        assert_eq!(image.name, "cirros-0.6.2-x86_64-disk");
        assert_eq!(
            (
                image.disk_format.as_str(),
                image.container_format.as_str(),
                image.status.as_str()
            ),
            ("qcow2", "bare", "active")
        );
        assert_eq!(
            (image.min_disk, image.min_ram, image.size_bytes),
            (0, 0, 21_430_272)
        );
        assert_eq!(image.location, None);
        let by_name = db.image_get_by_name("cirros-0.6.2-x86_64-disk").unwrap();
        assert_eq!(by_name, Some(image));
        assert!(db.image_get("nope").unwrap().is_none());
        assert!(db.image_get_by_name("nope").unwrap().is_none());
    }
}
