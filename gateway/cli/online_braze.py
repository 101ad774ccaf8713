"""`gateway check --online` for Braze: key, instance, permissions, subscription group ids."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from gateway.cli.online_checker import Checker, Reply
from gateway.config.settings import braze_base_url


class BrazeChecker(Checker):
    """The Braze probes of one run."""

    async def braze(self) -> None:
        braze = self.config.braze
        base = braze_base_url(braze.server)
        host = urlsplit(base).netloc
        timeout = braze.timeout_s
        headers = {"Authorization": f"Bearer {braze.api_key}"}
        # users.track, the key and the instance: an update-only object for nobody.
        body = {"attributes": [{"external_id": self.probe, "_update_existing_only": True}]}
        answer = await self.call("POST", base + "/users/track", timeout, headers=headers, json=body)
        if isinstance(answer, str):
            self.down(("braze", "server"), f"cannot reach Braze at {host}: {answer}")
            return
        if answer.status == 401:
            self.at_key(
                ("braze", "api_key"),
                f"Braze at {host} refused the key ({answer.said()}): braze.api_key is wrong, or"
                f" was made on another instance than braze.server = {braze.server!r} (a key"
                " works only on its own instance's REST endpoint)",
            )
            return
        if answer.status in (404, 405) or 300 <= answer.status < 400:
            self.at_key(
                ("braze", "server"),
                f"Braze at {host} answered {answer.said()} on /users/track: braze.server is not"
                " a Braze REST endpoint (an instance name such as US-01, or rest.*.braze.com)",
            )
            return
        if answer.status == 403:
            self.at_key(
                ("braze", "api_key"),
                f"the Braze key lacks users.track ({answer.said()}): every update needs it;"
                " create a key with users.track (Braze keys cannot be edited)",
            )
        elif answer.status == 400:
            # Inferred, not documented: Braze answers 401/403 for the key before it reads the
            # body, so a 400 to our bare probe object still says the key and permission are right.
            self.report.summary.append(
                f"Braze {host}: the key works, with users.track (the probe got {answer.said()})"
            )
        elif not 200 <= answer.status < 300:
            self.said(answer, ("braze", "server"), f"Braze at {host} answered {answer.said()}")
            return
        else:
            self.report.summary.append(f"Braze {host}: the key works, with users.track")
        if self.config.didomi.on_user_deleted == "delete":
            self.at_key(
                ("didomi", "on_user_deleted"),
                'didomi.on_user_deleted = "delete" needs the Braze key\'s users.delete, which'
                " cannot be checked without deleting: verify it in Braze's dashboard (Settings,"
                " APIs and Identifiers)",
                warning=True,
            )
        await self._groups(base, host, headers)
        await self._export(base, host, headers)

    def _reconcile_only(self, permission: str, what: str, answer: Reply) -> None:
        """A read only reconcile needs: a warning, or an error when [check] reconcile says so."""
        used = self.config.check.reconcile
        self.at_key(
            ("check", "reconcile") if used else ("braze", "api_key"),
            f"the Braze key lacks {permission} ({answer.said()}): `gateway reconcile` needs it"
            f"{what}"
            + (
                ""
                if used
                else "; the running gateway does not ([check] reconcile = true makes this an error)"
            ),
            warning=not used,
        )

    async def _groups(self, base: str, host: str, headers: Mapping[str, str]) -> None:
        refs = self.refs("group")
        groups = sorted({r.id for r in refs})
        known = 0
        for group in groups:
            params = [("subscription_group_id", group), ("external_id[]", self.probe)]
            url = base + "/subscription/status/get"
            answer = await self.call(
                "GET", url, self.config.braze.timeout_s, headers=headers, params=params
            )
            if isinstance(answer, str):
                self.down(("braze", "server"), f"cannot reach Braze at {host}: {answer}")
                return
            if answer.status == 403:
                self._reconcile_only(
                    "subscription.status.get",
                    f", and without it the {len(groups)} subscription group id(s) of the rules"
                    " cannot be checked here: compare them with Braze's Subscription Groups page",
                    answer,
                )
                return
            if 200 <= answer.status < 300:
                known += 1
            elif 400 <= answer.status < 500 and answer.status not in (401, 429):
                for ref in refs:
                    if ref.id == group:
                        self.at_rule(
                            ref,
                            f"Braze at {host} knows no subscription group {group!r}"
                            f" ({answer.said()}): copy its id from Braze's Subscription Groups"
                            " page (the group must be in this key's workspace)",
                        )
            else:
                self.said(
                    answer,
                    ("braze", "server"),
                    f"Braze at {host} answered {answer.said()} for subscription group {group}",
                )
        if groups and known == len(groups):
            self.report.summary.append(f"Braze: {known} subscription group id(s) exist")

    async def _export(self, base: str, host: str, headers: Mapping[str, str]) -> None:
        body = {"external_ids": [self.probe], "fields_to_export": ["external_id"]}
        answer = await self.call(
            "POST", base + "/users/export/ids", self.config.braze.timeout_s, headers=headers,
            json=body,
        )  # fmt: skip
        if isinstance(answer, str):
            self.down(("braze", "server"), f"cannot reach Braze at {host}: {answer}")
        elif answer.status == 403:
            self._reconcile_only("users.export.ids", " to read Braze's state", answer)
        elif not 200 <= answer.status < 300:
            self.said(
                answer,
                ("braze", "server"),
                f"Braze at {host} answered {answer.said()} on /users/export/ids",
            )
