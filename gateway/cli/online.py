"""`gateway check --online`: ask Braze and Didomi, reading only, whether this config will work.

Which call answers which question (none changes any data):

- Braze key, instance and `users.track`: `POST /users/track` with one attributes object holding
  only a random `external_id` and `_update_existing_only: true` ("Update Only" mode, Braze's
  "User attributes object"): no profile exists, so none is created or changed. 401 is a wrong
  key or another instance's (errors.md), 403 a missing permission.
- `users.delete`: no call can answer it without deleting; a warning says to look in Braze.
- A subscription group id and `subscription.status.get`: `GET /subscription/status/get` for the
  group and a random external id. Braze does not document its answer for an unknown group: a
  2xx is taken as "the group exists", any other 4xx but 401/403/429 as "it does not".
- `users.export.ids`: `POST /users/export/ids` for a random external id (it lands in
  `invalid_user_ids`).
- Didomi's key: `POST /sessions` (a wrong key or secret is a 400); the organization, purposes
  and preferences: `GET /metadata/purposes` and `GET /preferences`, paged with $limit/$skip.
"""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.cli.online_braze import BrazeChecker
from gateway.cli.online_checker import Report
from gateway.cli.online_didomi import DidomiChecker
from gateway.config.settings import Config
from gateway.rules.mappings import RuleSet


async def check_online(config: Config, rules: RuleSet, config_path: str) -> Report:
    """Ask Braze and Didomi, at once, what the config needs of them; write nothing anywhere."""
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        braze = BrazeChecker(config, rules, config_path, session)
        didomi = DidomiChecker(config, rules, config_path, session)
        await asyncio.gather(braze.braze(), didomi.didomi())
    report = braze.report
    for part in (didomi.report,):
        report.errors.extend(part.errors)
        report.warnings.extend(part.warnings)
        report.summary.extend(part.summary)
        report.unreachable.extend(part.unreachable)
    return report


def run(config: Config, rules: RuleSet, config_path: str) -> Report:
    """`check_online` for the command line."""
    return asyncio.run(check_online(config, rules, config_path))
