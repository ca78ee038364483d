//! Profiles: display name and avatar. A change is also written into the user's member event in
//! every room they are joined to, as Synapse does, so other members see it.

use ruma::{OwnedRoomId, UserId, api::federation::query::get_profile_information, events::StateEventType};
use serde_json::{Value, json};

use crate::{Error, Homeserver, Result, rooms::EventDraft};

pub struct Profile {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

impl Homeserver {
    /// A user's profile: a remote user's from their server; unknown local users (after asking
    /// the services) are `404 M_NOT_FOUND`.
    pub async fn profile(&self, user_id: &UserId) -> Result<Profile> {
        if user_id.server_name() != self.server_name {
            let request = get_profile_information::v1::Request::new(user_id.to_owned());
            let response = self
                .federation
                .client
                .send(user_id.server_name(), request)
                .await?;
            let field = |name: &str| {
                response
                    .data
                    .get(name)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            return Ok(Profile {
                displayname: field("displayname"),
                avatar_url: field("avatar_url"),
            });
        }
        self.local_profile(user_id).await
    }

    /// A local user's profile, for this server's clients and for other servers' queries.
    pub async fn local_profile(&self, user_id: &UserId) -> Result<Profile> {
        if user_id.server_name() != self.server_name {
            return Err(Error::NotFound(format!("{user_id} is not a user of this server")));
        }
        self.ensure_user(user_id).await?;
        let user = self
            .store
            .user(user_id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound("Profile was not found".to_owned()))?;
        // Synapse gives every new account its localpart as display name.
        let displayname = user.displayname.or_else(|| Some(user_id.localpart().to_owned()));
        Ok(Profile {
            displayname,
            avatar_url: user.avatar_url,
        })
    }

    /// Sets the display name and/or avatar (`Some(None)` clears one) and updates member events.
    pub async fn set_profile(
        &self,
        user_id: &UserId,
        displayname: Option<Option<&str>>,
        avatar_url: Option<Option<&str>>,
    ) -> Result<()> {
        self.store
            .set_profile(user_id.as_str(), displayname, avatar_url)
            .await?;
        let profile = self.profile(user_id).await?;
        for room in self.rooms.joined_rooms(user_id).await? {
            let room_id = OwnedRoomId::try_from(room).map_err(Error::internal)?;
            let Some(member) = self
                .rooms
                .state_event(&room_id, &StateEventType::RoomMember, user_id.as_str())
                .await?
            else {
                continue;
            };
            let mut content = member.content_value();
            let set = |content: &mut Value, key: &str, value: &Option<String>| match value {
                Some(v) => content[key] = json!(v),
                None => {
                    if let Some(object) = content.as_object_mut() {
                        object.remove(key);
                    }
                }
            };
            set(&mut content, "displayname", &profile.displayname);
            set(&mut content, "avatar_url", &profile.avatar_url);
            if content == member.content_value() {
                continue;
            }
            let draft = EventDraft::state("m.room.member", user_id.as_str(), content);
            if let Err(e) = self.rooms.send(&room_id, user_id, draft, None).await {
                tracing::warn!(%room_id, %user_id, error = %e, "could not update member event with the new profile");
            }
        }
        Ok(())
    }
}
