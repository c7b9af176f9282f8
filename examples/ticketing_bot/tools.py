"""The agent's tools over the ticket database. The user id comes from the run config (``user_id``), never from
the model, so a user can only ever touch their own tickets."""

from typing import Literal

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool

from examples.ticketing_bot.tickets import TicketDB, TicketError


def as_sentence(text: str) -> str:
    """``text`` with a full stop if it does not end a sentence already (a copied span stops before its own)."""
    text = text.rstrip()
    return text if text[-1:] in ".!?" else f"{text}."


def make_tools(db: TicketDB) -> list:
    """The six ticket tools bound to ``db``. Their ``ticket_id`` arguments are grounded by
    :func:`value_providers`: the model can only name a ticket the user has."""

    def user(config: RunnableConfig) -> str:
        return config["configurable"]["user_id"]

    def summary(ticket: dict, reader: str) -> str:
        """A ticket as a few plain sentences to ``reader`` (the user), status and the news first (how a closed
        ticket was solved, else the newest note): a small model restates the first sentences it reads, and those
        answer "how is my ticket doing?"."""
        comments = ticket.get("comments", [])
        first = f"Your ticket {ticket['id']} is {ticket['status']} (updated {ticket['updated']})."
        earlier = list(reversed(comments))
        if ticket["status"] == "closed" and ticket.get("resolution"):
            first += f" Resolution: {as_sentence(ticket['resolution'])}"
        elif comments:
            newest, earlier = earlier[0], earlier[1:]
            who = "You" if newest["author"] == reader else f"The {newest['author']}"
            first += f" {who} wrote: {as_sentence(newest['text'])}"
        lines = [first, f"Title: {ticket['title']}"]
        if ticket.get("description") and ticket["description"] != ticket["title"]:
            lines.append(f"Problem: {ticket['description']}")
        lines += [f"Earlier comment by {c['author']}: {c['text']}" for c in earlier]
        return "\n".join(lines)

    def day(config: RunnableConfig) -> str | None:
        return config["configurable"].get("story_day")

    @tool(parse_docstring=True)
    def create_ticket(title: str, description: str, config: RunnableConfig) -> str:
        """Open a new support ticket for the user's problem.

        Args:
            title: a few words that name the problem.
            description: the problem as the user describes it.
        """
        return summary(db.create(user(config), title, description, day(config)), user(config))

    @tool
    def list_my_tickets(config: RunnableConfig) -> str:
        """List the user's open tickets with their status."""
        tickets = [summary(db.get(user(config), t["id"]), user(config)) for t in db.list(user(config))]
        return "\n".join(tickets) or "You have no open tickets."

    @tool(parse_docstring=True)
    def lookup_ticket(ticket_id: int, config: RunnableConfig) -> str:
        """Show one ticket with its status and comments.

        Args:
            ticket_id: the ticket's number.
        """
        try:
            return summary(db.get(user(config), ticket_id), user(config))
        except TicketError as err:
            return str(err)

    @tool(parse_docstring=True)
    def update_ticket_status(
        ticket_id: int,
        status: Literal["open", "in progress", "waiting for parts", "waiting for user"],
        config: RunnableConfig,
    ) -> str:
        """Change a ticket's status (open, in progress, waiting for parts, waiting for user).

        Args:
            ticket_id: the ticket's number.
            status: the new status.
        """
        try:
            return summary(db.update_status(user(config), ticket_id, status, day(config)), user(config))
        except TicketError as err:
            return str(err)

    @tool(parse_docstring=True)
    def comment_on_ticket(ticket_id: int, comment: str, config: RunnableConfig) -> str:
        """Add a note to a ticket.

        Args:
            ticket_id: the ticket's number.
            comment: the note, in the user's words.
        """
        try:
            return summary(
                db.comment(user(config), ticket_id, comment, author=user(config), day=day(config)), user(config)
            )
        except TicketError as err:
            return str(err)

    @tool(parse_docstring=True)
    def close_ticket(ticket_id: int, resolution: str, config: RunnableConfig) -> str:
        """Close a solved ticket with a short resolution.

        Args:
            ticket_id: the ticket's number.
            resolution: how the problem was solved.
        """
        try:
            return summary(db.close(user(config), ticket_id, resolution, day(config)), user(config))
        except TicketError as err:
            return str(err)

    return [create_ticket, list_my_tickets, lookup_ticket, update_ticket_status, comment_on_ticket, close_ticket]


def value_providers(db: TicketDB) -> dict:
    """``DeltaMemChat.value_providers`` for :func:`make_tools`: each turn, ``ticket_id`` may only name one of the
    user's tickets (their open ones for changes, any of theirs for a look-up); with none, those tools are not
    offered."""

    def open_ids(config) -> list[int]:
        return [t["id"] for t in db.list(config["configurable"]["user_id"])]

    def all_ids(config) -> list[int]:
        return [t["id"] for t in db.list(config["configurable"]["user_id"], include_closed=True)]

    changes = {"ticket_id": open_ids}
    return {
        "lookup_ticket": {"ticket_id": all_ids},
        "update_ticket_status": changes,
        "comment_on_ticket": changes,
        "close_ticket": changes,
    }


def span_arguments() -> dict:
    """``DeltaMemChat.span_arguments`` for :func:`make_tools`: a ticket's title and description, a comment and a
    resolution are spans of what the user wrote (the model picks the span)."""
    return {
        "create_ticket": ["title", "description"],
        "comment_on_ticket": ["comment"],
        "close_ticket": ["resolution"],
    }
