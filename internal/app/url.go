package app

import "net/url"

// RedactURL hides the password of a URL (redis://:secret@host) before it
// goes in a log line or a message.
func RedactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "<unparseable URL>"
	}
	return u.Redacted()
}
