//! Flavors and images: the catalogue a boot request picks from.

use diesel::prelude::*;

use crate::schema::{flavors, images};
use crate::{Db, Flavor, Image, Result};

/// The row id of the live flavor with this flavorid.
pub(crate) fn flavor_row_id(conn: &mut SqliteConnection, flavorid: &str) -> Result<i64> {
    flavors::table
        .filter(flavors::deleted.eq(0))
        .filter(flavors::flavorid.eq(flavorid))
        .select(flavors::id)
        .first(conn)
        .optional()?
        .ok_or_else(|| crate::DbError::NotFound {
            kind: "flavor",
            id: flavorid.to_string(),
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
        Ok(flavors::table
            .filter(flavors::deleted.eq(0))
            .filter(flavors::flavorid.eq(flavorid))
            .select(Flavor::as_select())
            .first(&mut conn)
            .optional()?)
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
        Ok(images::table
            .filter(images::deleted.eq(0))
            .filter(images::uuid.eq(uuid))
            .select(Image::as_select())
            .first(&mut conn)
            .optional()?)
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
