"""The openstacksdk part of scripts/client-scenario: the calls an SDK user makes, checked.

Run with the client virtualenv's python, with OS_CLIENT_CONFIG_FILE and OS_CLOUD naming an admin cloud.
Creates one server pinned to node-3 by a host-match hint, waits for it, checks where it landed, deletes it
and waits until it is gone. Exits non-zero with a message at the first wrong answer.
"""

import os
import sys
import warnings

import openstack

IMAGE = os.environ.get("ZOVA_IMAGE_NAME", "cirros-0.6.2-x86_64-disk")
FLAVOR = os.environ.get("ZOVA_FLAVOR_NAME", "m1.tiny")
NAME = os.environ.get("ZOVA_SDK_SERVER_NAME", f"sdk-{os.getpid()}")
HOST = "node-3"
WAIT = int(os.environ.get("ZOVA_CLIENT_WAIT", "180"))

warnings.simplefilter("ignore")
passed = 0


def ok(what):
    global passed
    passed += 1
    print(f"ok: sdk: {what}", flush=True)


def check(cond, what, got):
    if not cond:
        raise AssertionError(f"{what}; got {got!r}")
    ok(what)


def main(conn):
    flavor = conn.compute.find_flavor(FLAVOR, ignore_missing=False)
    check(flavor.name == FLAVOR, f"find_flavor({FLAVOR})", flavor.name)
    image = conn.image.find_image(IMAGE, ignore_missing=False)
    check(image.name == IMAGE, f"find_image({IMAGE})", image.name)
    names = [f.name for f in conn.compute.flavors()]
    check(FLAVOR in names, f"flavors() has {FLAVOR}", names)
    names = [i.name for i in conn.image.images()]
    check(IMAGE in names, f"images() has {IMAGE}", names)

    server = conn.compute.create_server(
        name=NAME,
        flavor_id=flavor.id,
        image_id=image.id,
        scheduler_hints={"scheduler_host_match": f"^{HOST}$"},
    )
    check(bool(server.id), "create_server answers with an id", server.id)
    try:
        server = conn.compute.wait_for_server(server, status="ACTIVE", wait=WAIT)
        check(server.status == "ACTIVE", "wait_for_server reaches ACTIVE", server.status)
        check(server.compute_host == HOST, f"the host-match hint put it on {HOST}", server.compute_host)
        found = conn.compute.find_server(NAME, ignore_missing=False)
        check(found.id == server.id, f"find_server({NAME}) finds it", found.id)
    finally:
        conn.compute.delete_server(server, ignore_missing=True)
    conn.compute.wait_for_delete(server, wait=WAIT)
    ok("delete_server + wait_for_delete")
    gone = conn.compute.find_server(server.id, ignore_missing=True)
    check(gone is None, "the deleted server is not found", gone)


if __name__ == "__main__":
    try:
        main(openstack.connect(cloud=os.environ.get("OS_CLOUD", "zova")))
    except Exception as e:  # every failure is reported the same way: what went wrong, non-zero exit
        print(f"client-scenario-sdk: FAIL: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        print(f"sdk: {passed} checks passed before the failure", flush=True)
        sys.exit(1)
    print(f"sdk: {passed} checks passed", flush=True)
