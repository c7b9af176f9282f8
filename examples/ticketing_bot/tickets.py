"""The ticket database of the example: one SQLite file through sqlite-utils."""

import sqlite3
import time
from pathlib import Path

import sqlite_utils

STATUSES = ("open", "in progress", "waiting for parts", "waiting for user", "closed")


class TicketError(ValueError):
    """A ticket operation that cannot be done (unknown ticket, wrong owner, bad status)."""


class TicketDB:
    """Tickets and their comments. Every method checks ownership: a user sees only their own tickets."""

    def __init__(self, path: str | Path):
        self.db = sqlite_utils.Database(sqlite3.connect(str(path), check_same_thread=False))
        self.db["tickets"].create(
            {
                "id": int,
                "user_id": str,
                "title": str,
                "description": str,
                "status": str,
                "created": str,
                "updated": str,
                "resolution": str,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db["comments"].create(
            {"id": int, "ticket_id": int, "author": str, "text": str, "created": str},
            pk="id",
            foreign_keys=[("ticket_id", "tickets", "id")],
            if_not_exists=True,
        )

    def create(self, user_id: str, title: str, description: str, day: str | None = None) -> dict:
        now = day or time.strftime("%Y-%m-%d")
        with self.db.conn:
            row_id = (
                self.db["tickets"]
                .insert(
                    {
                        "user_id": user_id,
                        "title": title.strip() or "untitled",
                        "description": description,
                        "status": "open",
                        "created": now,
                        "updated": now,
                        "resolution": "",
                    }
                )
                .last_pk
            )
        return self.get(user_id, row_id)

    def get(self, user_id: str, ticket_id: int) -> dict:
        rows = list(self.db.query("select * from tickets where id = ? and user_id = ?", [ticket_id, user_id]))
        if not rows:
            raise TicketError(f"no ticket #{ticket_id} for user {user_id}")
        ticket = rows[0]
        ticket["comments"] = list(
            self.db.query("select author, text, created from comments where ticket_id = ? order by id", [ticket_id])
        )
        return ticket

    def list(self, user_id: str, include_closed: bool = False) -> list[dict]:
        sql = "select id, title, status, updated from tickets where user_id = ?"
        sql += "" if include_closed else " and status != 'closed'"
        return list(self.db.query(sql + " order by id", [user_id]))

    def update_status(self, user_id: str, ticket_id: int, status: str, day: str | None = None) -> dict:
        if status not in STATUSES:
            raise TicketError(f"status must be one of {', '.join(STATUSES)}")
        self.get(user_id, ticket_id)
        with self.db.conn:
            self.db["tickets"].update(ticket_id, {"status": status, "updated": day or time.strftime("%Y-%m-%d")})
        return self.get(user_id, ticket_id)

    def comment(self, user_id: str, ticket_id: int, text: str, author: str = "agent", day: str | None = None) -> dict:
        self.get(user_id, ticket_id)
        now = day or time.strftime("%Y-%m-%d")
        with self.db.conn:
            self.db["comments"].insert({"ticket_id": ticket_id, "author": author, "text": text, "created": now})
            self.db["tickets"].update(ticket_id, {"updated": now})
        return self.get(user_id, ticket_id)

    def close(self, user_id: str, ticket_id: int, resolution: str, day: str | None = None) -> dict:
        self.get(user_id, ticket_id)
        with self.db.conn:
            self.db["tickets"].update(
                ticket_id, {"status": "closed", "resolution": resolution, "updated": day or time.strftime("%Y-%m-%d")}
            )
        return self.get(user_id, ticket_id)
