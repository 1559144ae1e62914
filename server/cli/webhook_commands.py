"""`trainyard webhook create|list|deliveries|test|delete`: your webhooks over HTTP
(server/webhooks_api.py; README "Webhooks").

Only the API: the event and format names are repeated here rather than imported from
shared/webhooks.py, which pulls in SQLAlchemy; the server refuses anything else by name.
"""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape

from server.cli.api_client import ApiClient, api_command
from server.cli.display import print_listing
from server.cli.job_commands import token_option, url_option

EVENTS = ("job.succeeded", "job.failed", "job.cancelled", "job.stalled", "sweep.finished")
FORMATS = ("json", "slack", "teams")


def _time(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


@click.group("webhook")
def webhook_group() -> None:
    """Webhooks: signed notifications of your jobs and sweeps."""


@webhook_group.command("create")
@click.argument("target", metavar="URL")
@click.option("--event", "-e", "events", multiple=True, required=True,
              type=click.Choice(EVENTS), help="An event to send (repeat for more).")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="json", show_default=True,
              help="json (the event), or a Slack or Teams message.")  # fmt: skip
@click.option("--stall-minutes", type=int, default=30, show_default=True,
              help="job.stalled: no progress for this long.")  # fmt: skip
@url_option
@token_option
@api_command
def webhook_create(
    target: str, events: tuple[str, ...], fmt: str, stall_minutes: int, **api: Any
) -> None:
    """Create a webhook for URL; its signing secret is printed this once."""
    body = {"url": target, "events": list(events), "format": fmt, "stall_minutes": stall_minutes}
    hook = ApiClient(api["url"], token=api["token"]).post("/webhooks", body)
    click.echo(f"Created webhook {hook['id']} for {hook['url']} ({', '.join(hook['events'])}).")
    click.echo("Its signing secret, shown this once (Trainyard-Signature; README 'Webhooks'):")
    click.echo(hook["secret"])


@webhook_group.command("list")
@click.option("--all", "all_users", is_flag=True, help="Every user's webhooks (admins only).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@url_option
@token_option
@api_command
def webhook_list(all_users: bool, as_json: bool, **api: Any) -> None:
    """Your webhooks, newest first."""
    client = ApiClient(api["url"], token=api["token"])
    body = client.get("/webhooks", {"all": "true"} if all_users else None)
    print_listing(
        body, "webhooks", as_json=as_json, empty="No webhooks.",
        columns=("id", "url", "events", "format", "enabled", "owner"),
        wrap={"url", "events", "owner"},
        row=lambda h: (str(h["id"]), escape(h["url"]), ", ".join(h["events"]), h["format"],
                       "yes" if h["enabled"] else "no", escape(h["owner"])),
    )  # fmt: skip


@webhook_group.command("deliveries")
@click.argument("webhook_id", type=int)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@url_option
@token_option
@api_command
def webhook_deliveries(webhook_id: int, limit: int, as_json: bool, **api: Any) -> None:
    """A webhook's delivery log, newest first."""
    client = ApiClient(api["url"], token=api["token"])
    body = client.get(f"/webhooks/{webhook_id}/deliveries", {"limit": str(limit)})

    def row(d: dict[str, Any]) -> tuple[str, ...]:
        answer = " ".join(x for x in (f"HTTP {d['last_status_code']}" if d["last_status_code"]
                                      else "", d["last_error"] or "") if x)  # fmt: skip
        return (escape(d["event_id"]), d["status"], str(d["attempts"]), escape(answer),
                _time(d["next_attempt_at"]), _time(d["created_at"]))  # fmt: skip

    print_listing(
        body, "deliveries", as_json=as_json, empty="Nothing delivered yet.",
        columns=("event id", "status", "attempts", "last answer", "next attempt", "created"),
        wrap={"last answer"}, row=row,
    )  # fmt: skip


@webhook_group.command("test")
@click.argument("webhook_id", type=int)
@url_option
@token_option
@api_command
def webhook_test(webhook_id: int, **api: Any) -> None:
    """Queue a ping for a webhook; `trainyard webhook deliveries` shows how it went."""
    body = ApiClient(api["url"], token=api["token"]).post(f"/webhooks/{webhook_id}/test")
    click.echo(f"Queued {body['event_id']}.")


@webhook_group.command("delete")
@click.argument("webhook_id", type=int)
@url_option
@token_option
@api_command
def webhook_delete(webhook_id: int, **api: Any) -> None:
    """Delete a webhook and its delivery log."""
    ApiClient(api["url"], token=api["token"]).delete(f"/webhooks/{webhook_id}")
    click.echo(f"Deleted webhook {webhook_id}.")
