"""The volume catalog of the RBD backend (base.Catalog): every host sees every volume.

One RADOS object, ``volplugin.catalog``, in the backend's default pool; one omap entry per volume
(key = volume name, value = the record as JSON). Each call is one bounded RADOS operation.
"""
from __future__ import annotations

import json

from plugincore.errors import BackendError

from .rbd_cluster import rados

CATALOG_OBJECT = "volplugin.catalog"
PAGE = 1000


class CatalogMixin:
    def _catalog(self, what: str, fn):
        return self.cluster.call(f"{what} (catalog object {self.pool}/{CATALOG_OBJECT})", fn, pool=self.pool)

    def catalog_put(self, name: str, record: dict) -> None:
        def put(ioctx):
            with rados.WriteOpCtx() as op:
                ioctx.set_omap(op, (name,), (json.dumps(record, sort_keys=True).encode(),))
                ioctx.operate_write_op(op, CATALOG_OBJECT)  # creates the object on first use
        self._catalog(f"recording volume {name}", put)

    def catalog_get(self, name: str) -> dict | None:
        def get(ioctx):
            with rados.ReadOpCtx() as op:
                values, _ = ioctx.get_omap_vals_by_keys(op, (name,))
                try:
                    ioctx.operate_read_op(op, CATALOG_OBJECT)
                except rados.ObjectNotFound:
                    return None
                raw = dict(values).get(name)
            return raw
        raw = self._catalog(f"looking up volume {name}", get)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise BackendError(f"the catalog record of volume {name} is not valid JSON") from None

    def catalog_list(self) -> list[str]:
        def listing(ioctx):
            names, after = [], ""
            while True:
                with rados.ReadOpCtx() as op:
                    values, _ = ioctx.get_omap_vals(op, after, "", PAGE)
                    try:
                        ioctx.operate_read_op(op, CATALOG_OBJECT)
                    except rados.ObjectNotFound:
                        return names
                    page = [key for key, _ in values]
                names += page
                if len(page) < PAGE:
                    return names
                after = page[-1]
        return self._catalog("listing volumes", listing)

    def catalog_delete(self, name: str) -> None:
        def delete(ioctx):
            with rados.WriteOpCtx() as op:
                ioctx.remove_omap_keys(op, (name,))
                try:
                    ioctx.operate_write_op(op, CATALOG_OBJECT)
                except rados.ObjectNotFound:
                    pass  # no catalog yet: nothing to delete
        self._catalog(f"forgetting volume {name}", delete)
