"""HTML pages for people: ``html`` writes the static report of a run folder or manifest (opened from disk, no server,
no network), from what ``data`` gathers and the SVG curves ``plots`` draws. Nothing is imported here, so loading one
page's module does not load the others."""
