"""``report.png``: wait by role over time, and queue depth over time."""
from __future__ import annotations

# Role colours from urgent (dark red) to patient (light blue), one per priority.
COLOURS = ['#7f0000', '#d7301f', '#fc8d59', '#fdcc8a', '#9ecae1', '#3182bd']


def plot(report: dict, roles: list[str], path) -> None:
    """``roles`` in priority order (first served first)."""
    import matplotlib
    matplotlib.use('Agg')  # no display needed, and none opened
    import matplotlib.pyplot as plt

    colour = {role: COLOURS[min(i, len(COLOURS) - 1)] for i, role in enumerate(roles)}
    b0, b1 = report['run']['phases']['burst']
    fig, (top, bottom, slots_ax) = plt.subplots(
        3, 1, figsize=(11, 9), sharex=True, gridspec_kw={'height_ratios': [3, 2, 1]})
    for ax in (top, bottom, slots_ax):
        ax.axvspan(b0, b1, color='0.92', zorder=0)
        ax.grid(True, color='0.85', linewidth=0.5)

    # Wait of each request against when it was submitted, a colour per role.
    waits = report['waits']
    for role in reversed(roles):  # urgent roles drawn last, on top
        pts = [(t, w) for t, w, r, _ in waits if r == role]
        if pts:
            top.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.8,
                        color=colour[role], label=f'{role} ({len(pts)})',
                        edgecolors='none')
    top.set_ylabel('wait before a GPU slot (s)')
    top.set_title('Wait by role: each dot is a request, at the time it was submitted')
    top.legend(loc='upper left', fontsize=8, ncols=2, title='role (requests)',
               title_fontsize=8)

    # Queue depth: ready requests stacked by role.
    tl = report['timeline']
    if tl['t']:
        series = [tl['ready_by_role'][r] for r in roles]
        bottom.stackplot(tl['t'], *series, colors=[colour[r] for r in roles],
                         labels=roles, alpha=0.85)
        bottom.legend(loc='upper right', fontsize=8, ncols=2)
    # Labelled here: the queue is still short where the burst begins.
    bottom.text(b0 + 0.01 * (b1 - b0), 0.96, ' burst', transform=bottom.get_xaxis_transform(),
                ha='left', va='top', fontsize=9, color='0.35')
    bottom.set_ylabel('requests waiting')
    bottom.set_title('Queue depth by role (ready in the broker)')

    # Busy GPU slots: full while anything waits.
    slots = report['gpu']['slots']  # the box's GPU slots, across models
    if tl['t']:
        slots_ax.step(tl['t'], tl['running'], where='post', color='black', linewidth=1.0)
        slots_ax.fill_between(tl['t'], tl['running'], step='post', color='0.6')
    slots_ax.set_ylim(0, slots + 0.5)
    slots_ax.set_yticks(range(slots + 1))
    slots_ax.set_ylabel('slots busy')
    slots_ax.set_title(f'GPU slots running a request (of {slots})')
    slots_ax.set_xlabel('seconds since the replay started')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
